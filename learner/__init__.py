"""dcrl learner."""
