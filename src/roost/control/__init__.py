"""Administration of a broker (users, vhosts, permissions) through a local
control socket, or directly on a stopped broker's data directory."""
