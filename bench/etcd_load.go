// The load generator of bench/etcd.py: puts against an etcd v3 cluster through etcd's own
// Go client (go.etcd.io/etcd/clientv3), in the shapes of `liferaft bench`.
//
// bench/etcd.py builds it in GOPATH mode against Debian's golang-etcd-server-dev (etcd
// 3.4's source, the same as the etcd-server binary) and golang-go; nothing is downloaded.
// It is not meant to be run by hand: bench/etcd.py starts the cluster and reads the JSON
// this prints on stdout (plus the latencies, float64 seconds little-endian, in -latencies).
//
// Load: -conns gRPC connections (one clientv3.Client each, to the leader only), each
// shared by -writers goroutines doing Put in a closed loop; with -rate R, request k is due
// at start + k/R whatever the completions (at most conns x writers in flight, latency
// counted from when it was due). Keys bench/000000..bench/099999, cycling. Bounded by
// -seconds and -max-ops; requests in flight at the end get one -timeout.
package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/pkg/transport"
	"go.uber.org/zap"
	"google.golang.org/grpc/status"
)

const keyspace = 100000

type result struct {
	Ops          int64            `json:"ops"`
	Issued       int64            `json:"issued"`
	Late         int64            `json:"late"`
	Seconds      float64          `json:"seconds"`
	Errors       map[string]int64 `json:"errors"`
	TermBefore   uint64           `json:"term_before"`
	TermAfter    *uint64          `json:"term_after"`
	Leader       string           `json:"leader"`
	Version      string           `json:"version"`
	CPUTicks     map[string]int64 `json:"cpu_ticks"`
	SelfCPUTicks int64            `json:"self_cpu_ticks"`
	// All CPUs of the machine, from /proc/stat: ticks busy and ticks in all.
	MachineBusyTicks  int64 `json:"machine_busy_ticks"`
	MachineTotalTicks int64 `json:"machine_total_ticks"`
	// The leader's /metrics over the timed part (name -> increase), when it answered.
	LeaderMetrics map[string]float64 `json:"leader_metrics"`
}

// The leader's counters worth reporting: its disk syncs, and how many proposals it applied.
var leaderMetrics = []string{
	"etcd_disk_wal_fsync_duration_seconds_count",
	"etcd_disk_wal_fsync_duration_seconds_sum",
	"etcd_disk_backend_commit_duration_seconds_count",
	"etcd_disk_backend_commit_duration_seconds_sum",
	"etcd_server_proposals_applied_total",
}

type load struct {
	maxOps   int64
	deadline time.Time
	timeout  time.Duration
	value    string
	issued   int64 // atomic
	nextKey  int64 // atomic
	done     int64 // atomic
	failed   int64 // atomic
	mu       sync.Mutex
	errors   map[string]int64
	lats     [][]float64
}

// take claims one more request if time and count allow.
func (l *load) take() bool {
	if !time.Now().Before(l.deadline) {
		return false
	}
	for {
		n := atomic.LoadInt64(&l.issued)
		if n >= l.maxOps {
			return false
		}
		if atomic.CompareAndSwapInt64(&l.issued, n, n+1) {
			return true
		}
	}
}

// put does one put; the latency counts from due.
func (l *load) put(c *clientv3.Client, due time.Time, lats *[]float64) {
	k := atomic.AddInt64(&l.nextKey, 1) - 1
	key := fmt.Sprintf("bench/%06d", k%keyspace)
	ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
	_, err := c.Put(ctx, key, l.value)
	cancel()
	if err != nil {
		code := status.Code(err).String()
		if errors.Is(err, context.DeadlineExceeded) {
			code = "DeadlineExceeded"
		}
		atomic.AddInt64(&l.failed, 1)
		l.mu.Lock()
		l.errors[code]++
		l.mu.Unlock()
		return
	}
	*lats = append(*lats, time.Since(due).Seconds())
	atomic.AddInt64(&l.done, 1)
}

func (l *load) keep(lats []float64) {
	l.mu.Lock()
	l.lats = append(l.lats, lats)
	l.mu.Unlock()
}

func closedLoop(clients []*clientv3.Client, writers int, l *load) {
	var wg sync.WaitGroup
	for _, c := range clients {
		for w := 0; w < writers; w++ {
			wg.Add(1)
			go func(c *clientv3.Client) {
				defer wg.Done()
				var lats []float64
				for l.take() {
					l.put(c, time.Now(), &lats)
				}
				l.keep(lats)
			}(c)
		}
	}
	wg.Wait()
}

func openLoop(clients []*clientv3.Client, writers int, rate float64, l *load) int64 {
	slots := make(chan struct{}, len(clients)*writers)
	var wg sync.WaitGroup
	var late int64
	start := time.Now()
	behind := false // the cap held a request back and the schedule has not caught up
	for {
		n := atomic.LoadInt64(&l.issued)
		due := start.Add(time.Duration(float64(n) / rate * float64(time.Second)))
		if !due.Before(l.deadline) || n >= l.maxOps {
			break
		}
		if wait := time.Until(due); wait > 0 {
			behind = false
			time.Sleep(wait)
		}
		select {
		case slots <- struct{}{}:
		default:
			behind = true
			slots <- struct{}{}
		}
		if behind {
			late++
		}
		atomic.AddInt64(&l.issued, 1)
		wg.Add(1)
		go func(c *clientv3.Client, due time.Time) {
			defer wg.Done()
			var lats []float64
			l.put(c, due, &lats)
			l.keep(lats)
			<-slots
		}(clients[(n+1)%int64(len(clients))], due)
	}
	wg.Wait()
	return late
}

func cpuTicks(pid string) int64 {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return -1
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndex(s, ")")+1:]) // f[0] is the state
	if len(f) < 13 {
		return -1
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	k, _ := strconv.ParseInt(f[12], 10, 64)
	return u + k
}

// machineTicks returns the busy and total ticks of all CPUs (the "cpu" line of /proc/stat).
func machineTicks() (int64, int64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return -1, -1
	}
	line := strings.SplitN(string(b), "\n", 2)[0]
	f := strings.Fields(line)
	var busy, total int64
	for i, x := range f[1:] {
		n, _ := strconv.ParseInt(x, 10, 64)
		if i >= 8 { // guest and guest_nice are already in user and nice
			break
		}
		total += n
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy, total
}

// metrics reads the named counters from a member's /metrics; nil if it does not answer.
func metrics(endpoint string, tlsConfig *tls.Config) map[string]float64 {
	hc := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConfig}}
	resp, err := hc.Get(endpoint + "/metrics")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		for _, name := range leaderMetrics {
			if f[0] == name {
				if v, err := strconv.ParseFloat(f[1], 64); err == nil {
					out[name] = v
				}
			}
		}
	}
	return out
}

// leader waits until some endpoint reports a leader; it returns the leader's endpoint,
// the raft term and the server version.
func leader(c *clientv3.Client, endpoints []string, wait time.Duration) (string, uint64, string, error) {
	until := time.Now().Add(wait)
	var last error
	for time.Now().Before(until) {
		for _, ep := range endpoints {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			st, err := c.Status(ctx, ep)
			cancel()
			if err != nil {
				last = err
				continue
			}
			if st.Leader != 0 && st.Leader == st.Header.MemberId {
				return ep, st.RaftTerm, st.Version, nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return "", 0, "", fmt.Errorf("no leader within %v (last error: %v)", wait, last)
}

func progress(l *load, start time.Time, stop <-chan struct{}) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var last int64
	for {
		select {
		case <-stop:
			fmt.Fprint(os.Stderr, "\r\x1b[K")
			return
		case <-t.C:
			done := atomic.LoadInt64(&l.done)
			fmt.Fprintf(os.Stderr, "\r\x1b[K%5.1f s  %d ops  %d/s now  %d errors",
				time.Since(start).Seconds(), done, done-last, atomic.LoadInt64(&l.failed))
			last = done
		}
	}
}

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "etcd_load: "+format+"\n", a...)
	os.Exit(1)
}

func main() {
	endpoints := flag.String("endpoints", "", "comma-separated https URLs of the members")
	cacert := flag.String("cacert", "", "CA certificate")
	cert := flag.String("cert", "", "client certificate")
	key := flag.String("key", "", "client key")
	conns := flag.Int("conns", 4, "gRPC connections")
	writers := flag.Int("writers", 64, "concurrent puts per connection (open loop: the cap)")
	rate := flag.Float64("rate", 0, "open loop: requests per second (0: closed loop)")
	seconds := flag.Float64("seconds", 10, "how long requests start")
	maxOps := flag.Int64("max-ops", 10000000, "most requests")
	valueSize := flag.Int("value-size", 100, "bytes per value")
	timeout := flag.Duration("timeout", 5*time.Second, "one request's timeout")
	wait := flag.Duration("wait", 30*time.Second, "how long to wait for a leader")
	pids := flag.String("pids", "", "comma-separated pids whose CPU to measure")
	latFile := flag.String("latencies", "", "write the latencies here")
	showProgress := flag.Bool("progress", false, "a progress line on stderr once a second")
	flag.Parse()

	tlsConfig, err := transport.TLSInfo{CertFile: *cert, KeyFile: *key, TrustedCAFile: *cacert}.ClientConfig()
	if err != nil {
		fail("TLS: %v", err)
	}
	// Errors are counted by code; the client's own retry warnings would only be noise.
	logConfig := zap.NewProductionConfig()
	logConfig.Level = zap.NewAtomicLevelAt(zap.ErrorLevel)
	config := func(eps []string) clientv3.Config {
		return clientv3.Config{
			Endpoints:   eps,
			DialTimeout: 5 * time.Second,
			TLS:         tlsConfig,
			LogConfig:   &logConfig,
		}
	}
	eps := strings.Split(*endpoints, ",")
	admin, err := clientv3.New(config(eps))
	if err != nil {
		fail("connect: %v", err)
	}
	defer admin.Close()
	lead, termBefore, version, err := leader(admin, eps, *wait)
	if err != nil {
		fail("%v", err)
	}
	// Like `liferaft bench`, which starts at the leader: every put goes to it directly.
	clients := make([]*clientv3.Client, *conns)
	for i := range clients {
		if clients[i], err = clientv3.New(config([]string{lead})); err != nil {
			fail("connect: %v", err)
		}
		defer clients[i].Close()
	}
	value := make([]byte, *valueSize)
	if _, err := rand.Read(value); err != nil {
		fail("random: %v", err)
	}
	// One put per connection so that every connection is up before the clock starts.
	for _, c := range clients {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		_, err := c.Put(ctx, "bench/warmup", string(value))
		cancel()
		if err != nil {
			fail("first put: %v", err)
		}
	}

	pidList := []string{}
	if *pids != "" {
		pidList = strings.Split(*pids, ",")
	}
	before := map[string]int64{}
	for _, p := range pidList {
		before[p] = cpuTicks(p)
	}
	selfBefore := cpuTicks("self")
	metricsBefore := metrics(lead, tlsConfig)
	busyBefore, totalBefore := machineTicks()
	start := time.Now()
	l := &load{
		maxOps:   *maxOps,
		deadline: start.Add(time.Duration(*seconds * float64(time.Second))),
		timeout:  *timeout,
		value:    string(value),
		errors:   map[string]int64{},
	}
	stop := make(chan struct{})
	if *showProgress {
		go progress(l, start, stop)
	}
	var late int64
	if *rate > 0 {
		late = openLoop(clients, *writers, *rate, l)
	} else {
		closedLoop(clients, *writers, l)
	}
	elapsed := time.Since(start).Seconds()
	busyAfter, totalAfter := machineTicks()
	close(stop)
	res := result{
		Issued:       atomic.LoadInt64(&l.issued),
		Late:         late,
		Seconds:      elapsed,
		Errors:       l.errors,
		TermBefore:   termBefore,
		Leader:       lead,
		Version:      version,
		CPUTicks:     map[string]int64{},
		SelfCPUTicks: cpuTicks("self") - selfBefore,
	}
	if busyBefore >= 0 && busyAfter >= 0 {
		res.MachineBusyTicks = busyAfter - busyBefore
		res.MachineTotalTicks = totalAfter - totalBefore
	}
	if metricsAfter := metrics(lead, tlsConfig); metricsBefore != nil && metricsAfter != nil {
		res.LeaderMetrics = map[string]float64{}
		for name, v := range metricsAfter {
			res.LeaderMetrics[name] = v - metricsBefore[name]
		}
	}
	for _, p := range pidList {
		if now := cpuTicks(p); now >= 0 && before[p] >= 0 {
			res.CPUTicks[p] = now - before[p]
		}
	}
	if _, term, _, err := leader(admin, eps, *timeout); err == nil {
		res.TermAfter = &term
	}

	var out *os.File
	if *latFile != "" {
		if out, err = os.Create(*latFile); err != nil {
			fail("%v", err)
		}
	}
	buf := make([]byte, 8)
	var chunk []byte
	for _, lats := range l.lats {
		res.Ops += int64(len(lats))
		if out == nil {
			continue
		}
		chunk = chunk[:0]
		for _, x := range lats {
			binary.LittleEndian.PutUint64(buf, math.Float64bits(x))
			chunk = append(chunk, buf...)
		}
		if _, err := out.Write(chunk); err != nil {
			fail("%v", err)
		}
	}
	if out != nil {
		if err := out.Close(); err != nil {
			fail("%v", err)
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fail("%v", err)
	}
}
