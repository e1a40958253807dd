"""The outgoing side: composing, building and delivering mail, and filing it in Sent or Drafts."""
