package cni

import "time"

// limiter is a token bucket over repairs (writes), not over checks: a burst
// of repairs goes through at once, so a primary rewriting its file is
// re-chained at once, but an installer that keeps removing sidelane's entry
// gets at most one repair per interval instead of a write storm.
type limiter struct {
	burst  float64
	every  time.Duration
	tokens float64
	last   time.Time
}

func newLimiter(burst int, every time.Duration) *limiter {
	return &limiter{burst: float64(burst), every: every, tokens: float64(burst)}
}

// allow takes a token at now, or says how long until one is available.
func (l *limiter) allow(now time.Time) (bool, time.Duration) {
	if !l.last.IsZero() && now.After(l.last) {
		l.tokens += float64(now.Sub(l.last)) / float64(l.every)
		if l.tokens > l.burst {
			l.tokens = l.burst
		}
	}
	if l.last.IsZero() || now.After(l.last) {
		l.last = now
	}
	if l.tokens >= 1 {
		l.tokens--
		return true, 0
	}
	return false, time.Duration((1 - l.tokens) * float64(l.every))
}
