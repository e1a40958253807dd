"""What the service removes, and when: deleted accounts' data, and uploads no message uses."""
