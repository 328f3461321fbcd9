"""The dashboard's pages, one module each (listed in ``dashboards.app.main.pages``)."""
