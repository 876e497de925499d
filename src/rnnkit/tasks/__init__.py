"""Tasks: data preparation, model head and metrics for one problem each; training goes through rnnkit.train."""
