"""The Streamlit live dashboard: a bus reader, a per-run state reducer, chart/table builders and the pages."""
