"""What tests share: the test domains and their oracle, running the command and worker processes, waiting."""
