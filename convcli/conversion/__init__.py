"""The parts of `convcli.convert`: safe checkpoint reading, GPT-2 key mapping, verification."""
