"""The web target's static app and what puts it into a build: bundle (files), browser (headless Chromium), check
(validation's run of the page)."""
