"""Running mounts: config files, the control socket, Prometheus metrics, systemd
notifications."""
