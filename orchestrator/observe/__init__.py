"""What operators watch: metrics, the HTTP endpoint, logging."""
