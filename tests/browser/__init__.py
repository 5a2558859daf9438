"""Tests in a real browser: Debian's headless Chromium, driven over the DevTools protocol."""
