"""HTML reports with PNG plots (embedded, self-contained pages)."""
