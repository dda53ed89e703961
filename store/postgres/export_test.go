package postgres

// CacheGeneration returns the session cache's generation, which every
// invalidation advances: tests use it to see that a notification has been
// processed.
func (s *Store) CacheGeneration() uint64 { return s.cache.generation() }

// CacheReady reports whether the store serves sessions from its cache yet.
func (s *Store) CacheReady() bool { return s.cacheUsable() }
