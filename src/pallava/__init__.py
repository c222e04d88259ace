"""pallava: a pathology language-vision assistant."""
