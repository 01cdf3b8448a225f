"""Reports: pure functions from a scenario's results dict to Markdown and PNG. A report imports the kit (formatters,
plots), never a scenario."""
