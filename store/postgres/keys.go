package postgres

import (
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokend/tokend/issuer"
)

var _ issuer.KeyStore = (*Store)(nil)

// Keys implements issuer.KeyStore: every stored key, decrypted.
func (s *Store) Keys(ctx context.Context) ([]issuer.StoredKey, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	return s.readKeys(ctx, s.pool)
}

type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

func (s *Store) readKeys(ctx context.Context, q querier) ([]issuer.StoredKey, error) {
	rows, err := q.Query(ctx, `SELECT kid, alg, private_key, created_at, activates_at FROM signing_keys ORDER BY activates_at, kid`)
	if err != nil {
		return nil, fmt.Errorf("read signing keys: %w", classify(err))
	}
	type row struct {
		kid, alg    string
		sealed      []byte
		created, at time.Time
	}
	raw, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var x row
		return x, r.Scan(&x.kid, &x.alg, &x.sealed, &x.created, &x.at)
	})
	if err != nil {
		return nil, fmt.Errorf("read signing keys: %w", classify(err))
	}
	keys := make([]issuer.StoredKey, 0, len(raw))
	for _, x := range raw {
		der, err := open(s.kek, x.sealed, x.kid)
		if err != nil {
			return nil, fmt.Errorf("signing key %s: cannot decrypt it with the configured key-encryption key", x.kid)
		}
		priv, err := x509.ParsePKCS8PrivateKey(der)
		if err != nil {
			return nil, fmt.Errorf("signing key %s: %w", x.kid, err)
		}
		signer, ok := priv.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("signing key %s: not a signing key", x.kid)
		}
		k, err := issuer.NewKey(issuer.Algorithm(x.alg), signer, x.created)
		if err != nil {
			return nil, fmt.Errorf("signing key %s: %w", x.kid, err)
		}
		if k.ID != x.kid {
			return nil, fmt.Errorf("signing key %s: stored kid does not match the key", x.kid)
		}
		keys = append(keys, issuer.StoredKey{Key: k, ActivatesAt: x.at})
	}
	return keys, nil
}

// UpdateKeys implements issuer.KeyStore. The lock is a transaction-scoped
// advisory lock; other instances learn of the change through NOTIFY.
func (s *Store) UpdateKeys(ctx context.Context, fn func([]issuer.StoredKey) ([]issuer.StoredKey, []string, error)) error {
	ctx, cancel := context.WithTimeout(ctx, 4*s.opTimeout)
	defer cancel()
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, keysLockID); err != nil {
			return err
		}
		keys, err := s.readKeys(ctx, tx)
		if err != nil {
			return err
		}
		add, remove, err := fn(keys)
		if err != nil {
			return err
		}
		if len(add) == 0 && len(remove) == 0 {
			return nil
		}
		for _, k := range add {
			der, err := x509.MarshalPKCS8PrivateKey(k.Private)
			if err != nil {
				return fmt.Errorf("encode signing key: %w", err)
			}
			sealed, err := seal(s.kek, der, k.ID)
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `INSERT INTO signing_keys (kid, alg, private_key, created_at, activates_at)
				VALUES ($1, $2, $3, $4, $5)`, k.ID, string(k.Algorithm), sealed, k.CreatedAt, k.ActivatesAt); err != nil {
				return err
			}
		}
		if len(remove) > 0 {
			if _, err := tx.Exec(ctx, `DELETE FROM signing_keys WHERE kid = ANY($1)`, remove); err != nil {
				return err
			}
		}
		_, err = tx.Exec(ctx, `SELECT pg_notify($1, '')`, keysChannel)
		return err
	})
	if err != nil {
		return fmt.Errorf("update signing keys: %w", classify(err))
	}
	return nil
}

// seal encrypts plaintext with AES-256-GCM under kek; the kid is bound as
// associated data, so a sealed key cannot be swapped onto another row.
func seal(kek, plaintext []byte, kid string) ([]byte, error) {
	aead, err := newAEAD(kek)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(plaintext)+aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	return aead.Seal(nonce, nonce, plaintext, []byte(kid)), nil
}

func open(kek, sealed []byte, kid string) ([]byte, error) {
	aead, err := newAEAD(kek)
	if err != nil {
		return nil, err
	}
	if len(sealed) < aead.NonceSize() {
		return nil, errors.New("sealed key too short")
	}
	return aead.Open(nil, sealed[:aead.NonceSize()], sealed[aead.NonceSize():], []byte(kid))
}

func newAEAD(kek []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}
