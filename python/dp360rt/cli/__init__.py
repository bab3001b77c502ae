"""The `dp360rt` command line: the verbs (:mod:`.main`), `dp360rt demo`, `dp360rt bench` and its
bar chart."""
