module uploadsvc/bench/goref
