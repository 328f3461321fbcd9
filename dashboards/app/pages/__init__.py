"""The dashboard's pages, one module each (see ``dashboards.app.main.pages``)."""
