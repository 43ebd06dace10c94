"""dcrl buffer."""
