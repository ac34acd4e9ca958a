"""Facts about the machine a build runs on: its CPU, and the process memory diffship measures and gives back."""
