"""dcrl actors."""
