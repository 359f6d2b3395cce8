"""hsplit.planner: pure-Python planning (file formats, cost model, solvers). Never imports torch."""
