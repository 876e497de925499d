"""Tasks: data preparation, model head and metrics for one problem each, on a shared foundation (``options``:
model options; ``base``: run directories, save/load, training preamble; ``lm``: language models;
``decoding``: sampling; ``encoders``: pooling and the encoder-decoder); training goes through rnnkit.train."""
