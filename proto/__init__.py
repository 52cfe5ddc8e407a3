"""ikefarm shared vocabulary: bus subjects and message schemas."""
