"""`convcli serve`: an OpenAI-compatible chat-completions server over the inference core."""
