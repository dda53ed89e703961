package api

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tokend/tokend/issuer"
	"github.com/tokend/tokend/store/ratelimit"
)

// Metrics are tokend's Prometheus metrics. Everything the API observes is
// counted here; values owned by other parts (keys, the rate limiter's
// fallback) are read when Prometheus scrapes.
type Metrics struct {
	reg prometheus.Gatherer

	tokens       prometheus.Counter
	refusals     *prometheus.CounterVec
	rateLimited  *prometheus.CounterVec
	shed         prometheus.Counter
	duration     *prometheus.HistogramVec
	inFlight     prometheus.Gauge
	created      prometheus.Counter
	revoked      *prometheus.CounterVec
	jwks         *prometheus.CounterVec
	storeErrors  *prometheus.CounterVec
	refreshIn    prometheus.Histogram
	limiterStats func() ratelimit.FallbackStats
	keyStatus    func() []issuer.KeyStatus
	rotations    func() uint64
}

// NewMetrics registers tokend's metrics, and the Go and process
// collectors, with a new registry.
func NewMetrics() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	f := func(c prometheus.Collector) { reg.MustRegister(c) }
	m := &Metrics{reg: reg}
	m.tokens = prometheus.NewCounter(prometheus.CounterOpts{Name: "tokend_tokens_issued_total",
		Help: "Access tokens issued."})
	m.refusals = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokend_token_refusals_total",
		Help: "Token requests refused, by problem code (session_invalid, session_expired, session_revoked, origin_not_allowed, rate_limited, overloaded, unavailable, ...)."},
		[]string{"reason"})
	m.rateLimited = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokend_rate_limited_total",
		Help: "Requests refused with 429, by limit (ip, session, service)."}, []string{"limit"})
	m.shed = prometheus.NewCounter(prometheus.CounterOpts{Name: "tokend_shed_total",
		Help: "Requests shed with 503 overloaded because the in-flight bound was reached."})
	m.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "tokend_http_request_duration_seconds",
		Help:    "HTTP request duration, by route pattern, method and status.",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5}},
		[]string{"route", "method", "status"})
	m.inFlight = prometheus.NewGauge(prometheus.GaugeOpts{Name: "tokend_http_in_flight_requests",
		Help: "HTTP requests being served."})
	m.created = prometheus.NewCounter(prometheus.CounterOpts{Name: "tokend_sessions_created_total",
		Help: "Sessions created."})
	m.revoked = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokend_sessions_revoked_total",
		Help: "Successful revocation requests, by how: logout and admin count requests (repeating one for an already revoked session counts again), subject counts the sessions it revoked."}, []string{"how"})
	m.jwks = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokend_jwks_requests_total",
		Help: "JWKS requests, by status (200, 304)."}, []string{"status"})
	m.storeErrors = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokend_store_errors_total",
		Help: "Requests failed by the session store: unavailable (answered 503) or internal (answered 500)."},
		[]string{"kind"})
	m.refreshIn = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tokend_token_refresh_in_seconds",
		Help:    "refresh_in of issued tokens: how far ahead clients were told to come back. A spike in one bucket after a restart is a herd forming.",
		Buckets: []float64{5, 15, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 900, 1800, 3600}})
	for _, c := range []prometheus.Collector{m.tokens, m.refusals, m.rateLimited, m.shed, m.duration,
		m.inFlight, m.created, m.revoked, m.jwks, m.storeErrors, m.refreshIn} {
		f(c)
	}
	f(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "tokend_ratelimit_degraded",
		Help: "1 while the shared (Redis) rate limiter is unavailable and limits apply per instance."},
		func() float64 {
			if m.limiterStats != nil && m.limiterStats().Degraded {
				return 1
			}
			return 0
		}))
	f(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "tokend_ratelimit_local_decisions_total",
		Help: "Rate-limit decisions taken by the per-instance limiter (no Redis configured, or Redis unavailable)."},
		func() float64 {
			if m.limiterStats == nil {
				return 0
			}
			return float64(m.limiterStats().LocalDecisions)
		}))
	f(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "tokend_redis_errors_total",
		Help: "Failed calls to the shared (Redis) rate limiter."},
		func() float64 {
			if m.limiterStats == nil {
				return 0
			}
			return float64(m.limiterStats().SharedErrors)
		}))
	f(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "tokend_signing_key_switches_total",
		Help: "Times this instance started signing with a different key (rotations seen)."},
		func() float64 {
			if m.rotations == nil {
				return 0
			}
			return float64(m.rotations())
		}))
	f(&keyCollector{m: m,
		count: prometheus.NewDesc("tokend_signing_keys", "Published signing keys, by state (next, active, retired).", []string{"state"}, nil),
		age:   prometheus.NewDesc("tokend_signing_key_age_seconds", "Age of each published signing key, by state.", []string{"state", "kid"}, nil),
	})
	return m
}

// keyCollector reports the key set as it is at scrape time.
type keyCollector struct {
	m          *Metrics
	count, age *prometheus.Desc
}

func (c *keyCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.count; ch <- c.age }

func (c *keyCollector) Collect(ch chan<- prometheus.Metric) {
	if c.m.keyStatus == nil {
		return
	}
	counts := map[issuer.KeyState]int{issuer.KeyNext: 0, issuer.KeyActive: 0, issuer.KeyRetired: 0}
	now := time.Now()
	for _, k := range c.m.keyStatus() {
		counts[k.State]++
		ch <- prometheus.MustNewConstMetric(c.age, prometheus.GaugeValue, now.Sub(k.CreatedAt).Seconds(), string(k.State), k.ID)
	}
	for state, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.count, prometheus.GaugeValue, float64(n), string(state))
	}
}

// bind connects the metrics read at scrape time to the server's parts.
func (m *Metrics) bind(s *server) {
	if st, ok := s.protect.Limiter.(interface {
		Stats() ratelimit.FallbackStats
	}); ok {
		m.limiterStats = st.Stats
	}
	if s.keyAdmin != nil {
		m.keyStatus = s.keyAdmin.Status
	}
	if r, ok := s.keyAdmin.(interface{ Switches() uint64 }); ok {
		m.rotations = r.Switches
	}
}

// handler serves the metrics in the Prometheus text format.
func (m *Metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// observe records one finished request.
func (m *Metrics) observe(route, method string, status int, d time.Duration) {
	m.duration.WithLabelValues(route, method, strconv.Itoa(status)).Observe(d.Seconds())
}
