package redis

import (
	"context"
	"encoding/json"
	"log/slog"
	"sync/atomic"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/tokend/tokend/session"
)

// RevocationsChannel is the Redis channel on which tokend publishes every
// revocation it makes when TOKEND_REDIS_URL is set, for fleets that already
// listen to Redis. Each message is one JSON object:
//
//	{"sid":"…","subject":"alice","revoked_at":"2026-12-04T15:22:09Z","reason":"stolen","tokens_expire_at":"2026-12-04T15:32:09Z"}
//
// Publishing is best effort (pub/sub keeps nothing for a listener that is
// away); the revocation log behind GET /v1/revocations is the record.
const RevocationsChannel = "tokend:revocations"

// publishTimeout bounds one publication: a revocation is never held up,
// since it is published after it has committed, but a dead Redis must not
// pile up goroutines either.
const publishTimeout = time.Second

// Publisher publishes revocations on a Redis channel. It implements
// session.RevocationPublisher.
type Publisher struct {
	client  goredis.UniversalClient
	channel string
	log     *slog.Logger
	failing atomic.Bool
}

// NewPublisher returns a publisher on channel (RevocationsChannel in
// tokend).
func NewPublisher(client goredis.UniversalClient, channel string, log *slog.Logger) *Publisher {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Publisher{client: client, channel: channel, log: log}
}

// RevocationMessage is the JSON payload of each message on the channel.
type RevocationMessage struct {
	SID       string    `json:"sid"`
	Subject   string    `json:"subject"`
	RevokedAt time.Time `json:"revoked_at"`
	Reason    string    `json:"reason"`
	// TokensExpireAt is when every token of the session has expired;
	// validators may forget the revocation after it (plus their leeway).
	TokensExpireAt time.Time `json:"tokens_expire_at"`
}

// PublishRevocations publishes one message per revocation, in one round
// trip. A failure is logged once (and again after publishing has worked
// in between), never returned: the revocation itself has committed.
func (p *Publisher) PublishRevocations(ctx context.Context, revs []session.Revocation) {
	if len(revs) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, publishTimeout)
	defer cancel()
	pipe := p.client.Pipeline()
	for _, r := range revs {
		msg, err := json.Marshal(RevocationMessage{
			SID:            r.SID,
			Subject:        r.Subject,
			RevokedAt:      r.RevokedAt.UTC(),
			Reason:         r.Reason,
			TokensExpireAt: r.TokensExpireAt.UTC().Add(time.Second - time.Nanosecond).Truncate(time.Second),
		})
		if err != nil {
			continue // strings and times always marshal
		}
		pipe.Publish(ctx, p.channel, msg)
	}
	_, err := pipe.Exec(ctx)
	switch {
	case err != nil && !p.failing.Swap(true):
		p.log.Warn("publishing revocations on Redis failed; validators listening there miss them (the revocation feed has them)",
			slog.String("channel", p.channel), slog.Int("revocations", len(revs)), slog.Any("error", err))
	case err == nil && p.failing.Swap(false):
		p.log.Info("publishing revocations on Redis works again", slog.String("channel", p.channel))
	}
}
