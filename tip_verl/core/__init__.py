"""Pure tensor functions of TIP: token scores, selection rules, hybrid advantages, the selected-token LM head and
student/teacher divergences. No verl import here."""
