"""The web target's static app and what puts it into a build: bundle (files), browser (headless Chromium), run
(the page's image of one sample, which validation/app.py judges)."""
