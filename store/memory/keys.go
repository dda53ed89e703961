package memory

import (
	"context"
	"slices"
	"sync"

	"github.com/tokend/tokend/issuer"
)

// KeyStore keeps signing keys in memory: one instance's keys, for as long as
// it runs. It lets an instance without a database rotate keys like a fleet
// does.
type KeyStore struct {
	mu   sync.Mutex
	keys []issuer.StoredKey
}

var _ issuer.KeyStore = (*KeyStore)(nil)

// NewKeyStore returns an empty key store.
func NewKeyStore() *KeyStore { return &KeyStore{} }

// Keys implements issuer.KeyStore.
func (s *KeyStore) Keys(context.Context) ([]issuer.StoredKey, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.keys), nil
}

// UpdateKeys implements issuer.KeyStore; the lock is a mutex.
func (s *KeyStore) UpdateKeys(_ context.Context, fn func([]issuer.StoredKey) ([]issuer.StoredKey, []string, error)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	add, remove, err := fn(slices.Clone(s.keys))
	if err != nil {
		return err
	}
	s.keys = slices.DeleteFunc(s.keys, func(k issuer.StoredKey) bool { return slices.Contains(remove, k.ID) })
	s.keys = append(s.keys, add...)
	return nil
}
