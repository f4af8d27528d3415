"""Training: the loop (``loop``: setup -> step -> evaluate -> checkpoint -> save), one step's forward and
backward (``step``), the loss, checkpoints and resume, what a run logs, and experiment trackers."""
