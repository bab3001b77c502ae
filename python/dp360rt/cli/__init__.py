"""The `dp360rt` command line: the verbs (:mod:`.main`), the options every pipeline verb shares
(:mod:`.pipeline_args`), `dp360rt demo` and `dp360rt bench`, and their bar chart."""
