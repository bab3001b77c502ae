"""The I/O layer every part shares: result folders written atomically (:mod:`.results`), image
inputs and outputs (:mod:`.images`), checks of plain option values (:mod:`.checks`) and the
command line's progress bars (:mod:`.progress`)."""
