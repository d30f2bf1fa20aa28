// Command loadgen drives WebSocket load at one loopback URL and prints one
// JSON line of results (gorilla/websocket, built by bench/run.sh).
//
//	-mode pingpong   -c connections each keep -p messages of -s bytes in
//	                 flight and wait for their echo; after -w of warmup, the
//	                 echoes received during -d are counted and timed.
//	-mode idle       opens -c connections (-dialconc dials at a time), does one
//	                 echo round trip on each (-idleecho), prints a "ready" line
//	                 (also written to -readyfile), holds them for -hold, then
//	                 prints a "done" line.
//	-mode handshake  -c dialers each loop: connect, close handshake, for -d.
//
// Every loop is bounded in time (-d, -hold, and a watchdog that ends the
// process) and in count (-max per connection or dialer). Only loopback
// targets are accepted.
//
// Build (offline, GOPATH mode, Debian's golang-github-gorilla-websocket-dev):
//
//	GO111MODULE=off GOPATH=/tmp/gopath:/usr/share/gocode go build -o /tmp/wsgw-bench/bin/loadgen .
package main

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

type options struct {
	url      string
	mode     string
	conns    int
	size     int
	inflight int
	dur      time.Duration
	warm     time.Duration
	binary   bool
	hold     time.Duration
	dialConc int
	idleEcho bool
	ready    string
	label    string
	insecure bool
	max      int64
}

var opt options

func init() {
	flag.StringVar(&opt.url, "url", "ws://127.0.0.1:9001/ws", "target ws:// or wss:// URL (loopback only)")
	flag.StringVar(&opt.mode, "mode", "pingpong", "pingpong | idle | handshake")
	flag.IntVar(&opt.conns, "c", 50, "connections (pingpong, idle) or concurrent dialers (handshake)")
	flag.IntVar(&opt.size, "s", 64, "message size, bytes")
	flag.IntVar(&opt.inflight, "p", 1, "pingpong: messages in flight per connection")
	flag.DurationVar(&opt.dur, "d", 5*time.Second, "pingpong, handshake: measured duration")
	flag.DurationVar(&opt.warm, "w", time.Second, "pingpong: warmup before measuring")
	flag.BoolVar(&opt.binary, "binary", false, "send binary messages (default: text, ASCII payload)")
	flag.DurationVar(&opt.hold, "hold", 120*time.Second, "idle: how long to hold the connections (at most 1h; SIGTERM ends it sooner)")
	flag.IntVar(&opt.dialConc, "dialconc", 100, "idle: concurrent dials while opening")
	flag.BoolVar(&opt.idleEcho, "idleecho", true, "idle: one echo round trip per connection once open")
	flag.StringVar(&opt.ready, "readyfile", "", "idle: also write the ready line to this file")
	flag.StringVar(&opt.label, "label", "", "free-form label copied into the output")
	flag.BoolVar(&opt.insecure, "insecure", false, "wss: do not verify the certificate (self-signed test certificates)")
	flag.Int64Var(&opt.max, "max", 50_000_000, "upper bound on messages per connection / handshakes per dialer")
}

// ------------------------------------------------------------------ helpers

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "loadgen: "+format+"\n", a...)
	os.Exit(2)
}

// checkLoopback refuses any target that does not resolve to loopback only.
func checkLoopback(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return err
	}
	if u.Scheme != "ws" && u.Scheme != "wss" {
		return fmt.Errorf("scheme %q: ws or wss only", u.Scheme)
	}
	host := u.Hostname()
	var ips []net.IP
	if ip := net.ParseIP(host); ip != nil {
		ips = []net.IP{ip}
	} else if host == "localhost" {
		ips, err = net.LookupIP(host)
		if err != nil {
			return err
		}
	}
	if len(ips) == 0 {
		return fmt.Errorf("host %q: a loopback address is required", host)
	}
	for _, ip := range ips {
		if !ip.IsLoopback() {
			return fmt.Errorf("host %q (%s) is not loopback", host, ip)
		}
	}
	return nil
}

func processCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

func dialer() *websocket.Dialer {
	// gorilla masks client frames through its write buffer: one big enough
	// for the whole message keeps it to one frame per message.
	buf := opt.size + 64
	if buf < 4096 {
		buf = 4096
	} else if buf > 128<<10 {
		buf = 128 << 10
	}
	return &websocket.Dialer{
		HandshakeTimeout: 10 * time.Second,
		ReadBufferSize:   buf,
		WriteBufferSize:  buf,
		TLSClientConfig:  &tls.Config{InsecureSkipVerify: opt.insecure},
	}
}

func message() []byte {
	m := make([]byte, opt.size)
	for i := range m {
		m[i] = 'a' + byte(i%26)
	}
	return m
}

func frameType() int {
	if opt.binary {
		return websocket.BinaryMessage
	}
	return websocket.TextMessage
}

// latencies: microseconds, merged and sorted once at the end.
type latencies []uint32

func (l latencies) quantile(q float64) uint32 {
	if len(l) == 0 {
		return 0
	}
	return l[int(q*float64(len(l)-1))]
}

func merge(parts []latencies) latencies {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	all := make(latencies, 0, n)
	for _, p := range parts {
		all = append(all, p...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	return all
}

func micros(since time.Time) uint32 {
	us := time.Since(since).Microseconds()
	if us > 1<<32-1 {
		us = 1<<32 - 1
	}
	return uint32(us)
}

type result map[string]interface{}

func output(r result) {
	r["label"] = opt.label
	r["url"] = opt.url
	r["gomaxprocs"] = runtime.GOMAXPROCS(0)
	b, err := json.Marshal(r)
	if err != nil {
		fail("json: %v", err)
	}
	os.Stdout.Write(append(b, '\n'))
}

// waitFor waits for wg at most d; it reports whether every goroutine ended.
func waitFor(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// ------------------------------------------------------------------ pingpong

type pingpongConn struct {
	ws     *websocket.Conn
	lat    latencies
	msgs   int64
	errors int64
}

type window struct {
	open int32 // 1 while the measured window is open
	stop int32 // 1 once senders must stop
}

func (w *window) measuring() bool { return atomic.LoadInt32(&w.open) == 1 }
func (w *window) stopped() bool   { return atomic.LoadInt32(&w.stop) == 1 }

// echoed accounts for one reply received for a message sent at sent.
func (pc *pingpongConn) echoed(w *window, sent time.Time, reply, msg []byte) {
	if !w.measuring() {
		return
	}
	if len(reply) != len(msg) {
		pc.errors++
		return
	}
	pc.lat = append(pc.lat, micros(sent))
	pc.msgs++
}

// lockstep: one message in flight, sent and awaited by one goroutine.
func (pc *pingpongConn) lockstep(w *window, msg []byte, mt int) {
	for n := int64(0); n < opt.max && !w.stopped(); n++ {
		sent := time.Now()
		pc.ws.SetReadDeadline(sent.Add(10 * time.Second))
		if err := pc.ws.WriteMessage(mt, msg); err != nil {
			pc.errors++
			return
		}
		_, reply, err := pc.ws.ReadMessage()
		if err != nil {
			pc.errors++
			return
		}
		pc.echoed(w, sent, reply, msg)
	}
}

// pipelined: a writer goroutine keeps up to opt.inflight messages unanswered;
// the channel of send times is both its credit and the FIFO the reader
// matches replies against (a WebSocket echo answers in order).
func (pc *pingpongConn) pipelined(w *window, msg []byte, mt int) {
	sent := make(chan time.Time, opt.inflight)
	quit := make(chan struct{})
	defer close(quit)
	go func() {
		defer close(sent)
		for n := int64(0); n < opt.max && !w.stopped(); n++ {
			select {
			case sent <- time.Now():
			case <-quit:
				return
			}
			if err := pc.ws.WriteMessage(mt, msg); err != nil {
				return
			}
		}
	}()
	for t := range sent {
		pc.ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, reply, err := pc.ws.ReadMessage()
		if err != nil {
			pc.errors++
			return
		}
		pc.echoed(w, t, reply, msg)
	}
}

func pingpong() {
	d := dialer()
	msg, mt := message(), frameType()
	var conns []*pingpongConn
	dialErrors := 0
	for i := 0; i < opt.conns; i++ {
		ws, _, err := d.Dial(opt.url, nil)
		if err != nil {
			dialErrors++
			continue
		}
		conns = append(conns, &pingpongConn{ws: ws, lat: make(latencies, 0, 16<<10)})
	}
	var w window
	var wg sync.WaitGroup
	for _, pc := range conns {
		wg.Add(1)
		go func(pc *pingpongConn) {
			defer wg.Done()
			defer pc.ws.Close()
			if opt.inflight <= 1 {
				pc.lockstep(&w, msg, mt)
			} else {
				pc.pipelined(&w, msg, mt)
			}
		}(pc)
	}
	time.Sleep(opt.warm)
	cpu0, t0 := processCPU(), time.Now()
	atomic.StoreInt32(&w.open, 1)
	time.Sleep(opt.dur)
	atomic.StoreInt32(&w.open, 0)
	elapsed, cpu := time.Since(t0).Seconds(), processCPU()-cpu0
	atomic.StoreInt32(&w.stop, 1)
	if !waitFor(&wg, 15*time.Second) {
		// a connection still blocked in a read: its counters are read anyway
		// (the window is closed, nothing writes them any more)
		fmt.Fprintln(os.Stderr, "loadgen: some connections did not finish within 15 s")
	}
	parts := make([]latencies, len(conns))
	var msgs, errs int64
	for i, pc := range conns {
		parts[i] = pc.lat
		msgs += pc.msgs
		errs += pc.errors
	}
	all := merge(parts)
	output(result{
		"mode": "pingpong", "connections": len(conns), "size": opt.size, "pipeline": opt.inflight,
		"binary": opt.binary, "duration_s": elapsed, "msgs": msgs,
		"msgs_per_s":   float64(msgs) / elapsed,
		"mbytes_per_s": float64(msgs) * float64(opt.size) / elapsed / 1e6,
		"p50_us":       all.quantile(0.50), "p90_us": all.quantile(0.90),
		"p99_us": all.quantile(0.99), "max_us": all.quantile(1),
		"errors": errs + int64(dialErrors), "connect_errors": dialErrors,
		"loadgen_cpu_pct": 100 * cpu / elapsed,
	})
}

// ------------------------------------------------------------------ idle

func idle() {
	d := dialer()
	msg, mt := message(), frameType()
	conns := make([]*websocket.Conn, opt.conns)
	var dialErrs, echoErrs int64
	slots := make(chan struct{}, opt.dialConc)
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := range conns {
		slots <- struct{}{}
		wg.Add(1)
		go func(i int) {
			defer func() { <-slots; wg.Done() }()
			ws, _, err := d.Dial(opt.url, nil)
			if err != nil {
				atomic.AddInt64(&dialErrs, 1)
				return
			}
			if opt.idleEcho {
				ws.SetReadDeadline(time.Now().Add(10 * time.Second))
				err = ws.WriteMessage(mt, msg)
				if err == nil {
					var reply []byte
					_, reply, err = ws.ReadMessage()
					if err == nil && !bytes.Equal(reply, msg) {
						err = errors.New("echo differs")
					}
				}
				if err != nil {
					atomic.AddInt64(&echoErrs, 1)
				}
				ws.SetReadDeadline(time.Time{})
			}
			conns[i] = ws
		}(i)
	}
	wg.Wait()
	openSecs := time.Since(t0).Seconds()

	// one reader per connection: answers pings and close frames, counts drops
	var dropped int64
	open := 0
	for _, ws := range conns {
		if ws == nil {
			continue
		}
		open++
		go func(ws *websocket.Conn) {
			for {
				if _, _, err := ws.ReadMessage(); err != nil {
					atomic.AddInt64(&dropped, 1)
					return
				}
			}
		}(ws)
	}
	ready := result{
		"mode": "idle", "phase": "ready", "connections": open, "requested": opt.conns,
		"errors": dialErrs, "echo_errors": echoErrs, "open_s": openSecs,
	}
	output(ready)
	if opt.ready != "" {
		b, _ := json.Marshal(ready)
		if err := os.WriteFile(opt.ready, append(b, '\n'), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "loadgen:", err)
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-sig:
	case <-time.After(opt.hold):
	}
	output(result{"mode": "idle", "phase": "done", "connections": open,
		"dropped_while_idle": atomic.LoadInt64(&dropped)})
	for _, ws := range conns {
		if ws != nil {
			ws.Close()
		}
	}
}

// ------------------------------------------------------------------ handshake

func handshake() {
	d := dialer()
	var stop int32
	var done, errs int64
	var firstErr atomic.Value
	parts := make([]latencies, opt.conns)
	var wg sync.WaitGroup
	cpu0, t0 := processCPU(), time.Now()
	for i := range parts {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for n := int64(0); n < opt.max && atomic.LoadInt32(&stop) == 0; n++ {
				start := time.Now()
				ws, resp, err := d.Dial(opt.url, http.Header{})
				if err != nil {
					atomic.AddInt64(&errs, 1)
					status := ""
					if resp != nil {
						status = " " + resp.Status
					}
					firstErr.CompareAndSwap(nil, err.Error()+status)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				parts[i] = append(parts[i], micros(start))
				// close handshake: our close frame, then wait (2 s at most)
				// for the peer's close frame or the end of the TCP connection
				ws.WriteControl(websocket.CloseMessage,
					websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
				ws.SetReadDeadline(time.Now().Add(2 * time.Second))
				for {
					if _, _, err := ws.ReadMessage(); err != nil {
						break
					}
				}
				ws.Close()
				atomic.AddInt64(&done, 1)
			}
		}(i)
	}
	time.Sleep(opt.dur)
	atomic.StoreInt32(&stop, 1)
	waitFor(&wg, 15*time.Second)
	elapsed, cpu := time.Since(t0).Seconds(), processCPU()-cpu0
	all := merge(parts)
	fe, _ := firstErr.Load().(string)
	output(result{
		"mode": "handshake", "connections": opt.conns, "duration_s": elapsed,
		"handshakes": atomic.LoadInt64(&done), "handshakes_per_s": float64(atomic.LoadInt64(&done)) / elapsed,
		"errors": atomic.LoadInt64(&errs), "first_error": fe,
		"p50_us": all.quantile(0.50), "p90_us": all.quantile(0.90), "p99_us": all.quantile(0.99),
		"loadgen_cpu_pct": 100 * cpu / elapsed,
	})
}

func main() {
	flag.Parse()
	if err := checkLoopback(opt.url); err != nil {
		fail("refusing %s: %v", opt.url, err)
	}
	if opt.conns < 1 || opt.conns > 20000 || opt.size < 0 || opt.size > 16<<20 ||
		opt.inflight < 1 || opt.inflight > 1024 || opt.dialConc < 1 || opt.max < 1 {
		fail("out of range: -c 1..20000, -s 0..16M, -p 1..1024, -dialconc >= 1, -max >= 1")
	}
	if opt.dur <= 0 || opt.dur > 10*time.Minute || opt.warm < 0 || opt.warm > time.Minute {
		fail("out of range: 0 < -d <= 10m, 0 <= -w <= 1m")
	}
	if opt.hold <= 0 || opt.hold > time.Hour {
		fail("out of range: 0 < -hold <= 1h")
	}
	// watchdog: whatever a peer does, this process ends
	limit := opt.warm + opt.dur + 2*time.Minute
	if opt.mode == "idle" {
		limit = opt.hold + 5*time.Minute
	}
	time.AfterFunc(limit, func() {
		fmt.Fprintf(os.Stderr, "loadgen: watchdog: still running after %v, exiting\n", limit)
		os.Exit(3)
	})
	switch opt.mode {
	case "pingpong":
		pingpong()
	case "idle":
		idle()
	case "handshake":
		handshake()
	default:
		fail("unknown mode %q", opt.mode)
	}
}
