"""DialoGPT checkpoints into model folders: `convert.convert_checkpoint` orchestrates the parts
(safe checkpoint reading, GPT-2 key mapping, verification)."""
