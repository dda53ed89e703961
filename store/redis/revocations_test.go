package redis_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tokend/tokend/internal/testenv"
	"github.com/tokend/tokend/session"
	redisstore "github.com/tokend/tokend/store/redis"
)

func TestPublisherPublishesEachRevocation(t *testing.T) {
	sub := testenv.RedisClient(t)
	channel := testenv.RedisPrefix(t) + "revocations"
	ps := sub.Subscribe(context.Background(), channel)
	t.Cleanup(func() { _ = ps.Close() })
	if _, err := ps.Receive(context.Background()); err != nil { // the subscription confirmation
		t.Fatal(err)
	}

	client, err := redisstore.NewClient(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	p := redisstore.NewPublisher(client, channel, nil)
	at := time.Date(2026, 3, 1, 12, 0, 0, 123_000_000, time.FixedZone("X", 3600))
	p.PublishRevocations(context.Background(), []session.Revocation{
		{SID: "AAAAAAAAAAAAAAAAAAAAAA", Subject: "alice", RevokedAt: at, Reason: "stolen", TokensExpireAt: at.Add(10 * time.Minute)},
		{SID: "BBBBBBBBBBBBBBBBBBBBBB", Subject: "alice", RevokedAt: at, Reason: "stolen", TokensExpireAt: at.Add(10 * time.Minute)},
	})

	for _, sid := range []string{"AAAAAAAAAAAAAAAAAAAAAA", "BBBBBBBBBBBBBBBBBBBBBB"} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		msg, err := ps.ReceiveMessage(ctx)
		cancel()
		if err != nil {
			t.Fatalf("no message for %s: %v", sid, err)
		}
		var got map[string]any
		if err := json.Unmarshal([]byte(msg.Payload), &got); err != nil {
			t.Fatalf("payload %q: %v", msg.Payload, err)
		}
		want := map[string]any{
			"sid": sid, "subject": "alice", "reason": "stolen",
			"revoked_at":       "2026-03-01T11:00:00.123Z",
			"tokens_expire_at": "2026-03-01T11:10:01Z", // rounded up to the second
		}
		if len(got) != len(want) {
			t.Errorf("payload %s has other fields than %v", msg.Payload, want)
		}
		for k, v := range want {
			if got[k] != v {
				t.Errorf("%s = %v, want %v", k, got[k], v)
			}
		}
	}
}

// TestPublisherNeverFailsARevocation publishes to a Redis that is not
// there: it returns within its timeout and logs one warning.
func TestPublisherNeverFailsARevocation(t *testing.T) {
	client, err := redisstore.NewClient("redis://127.0.0.1:" + strconv.Itoa(testenv.FreePort(t)) + "/0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	var logs bytes.Buffer
	p := redisstore.NewPublisher(client, redisstore.RevocationsChannel, slog.New(slog.NewTextHandler(&logs, nil)))
	rev := []session.Revocation{{SID: "AAAAAAAAAAAAAAAAAAAAAA", Subject: "alice", RevokedAt: time.Now()}}
	for range 3 {
		start := time.Now()
		p.PublishRevocations(context.Background(), rev)
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("publishing to a dead Redis took %v", d)
		}
	}
	if n := strings.Count(logs.String(), "publishing revocations on Redis failed"); n != 1 {
		t.Errorf("%d warnings for three failures, want 1:\n%s", n, logs.String())
	}
}
