"""Pure tensor functions of TIP: token scores, selection rules, hybrid advantages. No verl import here."""
