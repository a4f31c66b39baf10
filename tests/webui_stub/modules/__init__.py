"""Stand-in for the WebUI's ``modules`` package (tests only; see ../README.md)."""
