"""`kn-ray explore OUT`: a read-only web app over one run (queries: DuckDB views with bound
parameters; app: Starlette routes and Jinja2 templates; options: the command's flags)."""
