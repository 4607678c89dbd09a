"""The step and its contract: the context a batch flows through, the callback base and its composition check,
the step that runs the callbacks, input validation and the BatchNorm modes of a forward."""
