"""Message normalisation and rendering at the edge: request limits and the render/tokenize pool."""
