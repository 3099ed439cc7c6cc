"""The data plane: listener, client-side HTTP/1.1, upstream pool, tunnels."""
