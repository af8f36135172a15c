"""What the terminal shows: the quiet console and its log routing (:mod:`.console`), and the
live display of a sweep (:mod:`.progress`)."""
