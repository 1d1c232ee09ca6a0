"""Pure tensor functions of TIP: token scores, selection rules, hybrid advantages, selected-token LM head and divergences. No verl import here."""
