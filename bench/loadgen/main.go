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
//	-mode payload    no network: prints the size and deflate ratio of the
//	                 messages -payload and -s would send.
//
// -payload json sends realistic JSON text (arrays of objects with repeated
// keys and varied numbers and strings, from a fixed -seed, 32 distinct
// messages of exactly -s bytes, cycled); the default is an ASCII pattern.
// Every echo must be byte-identical to the message it answers, or it counts
// as an error (mismatches). -compress negotiates permessage-deflate (RFC
// 7692; gorilla offers no context takeover only): a connection whose
// handshake response has no permessage-deflate in Sec-WebSocket-Extensions is
// an error, and pingpong then stops before sending anything (no figure is
// measured without the compression asked for).
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
	"compress/flate"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"sort"
	"strconv"
	"strings"
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
	payload  string
	seed     int64
	compress bool
	idleMsgs int
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
	flag.StringVar(&opt.payload, "payload", "ascii", "ascii (a letter pattern) | json (realistic JSON text, 32 distinct messages from -seed)")
	flag.Int64Var(&opt.seed, "seed", 1, "payload json: random seed (fixed, so that runs are comparable)")
	flag.BoolVar(&opt.compress, "compress", false, "negotiate permessage-deflate; a connection without it is an error")
	flag.IntVar(&opt.idleMsgs, "idlemsgs", 1, "idle: echo round trips per connection once open (with -idleecho)")
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
	d := &websocket.Dialer{
		HandshakeTimeout:  10 * time.Second,
		ReadBufferSize:    buf,
		WriteBufferSize:   buf,
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: opt.insecure},
		EnableCompression: opt.compress,
	}
	if opt.compress {
		// count the bytes on the wire: what the compression saved, end to end
		d.NetDialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &countingConn{Conn: c}, nil
		}
	}
	return d
}

// wireIn, wireOut: bytes read and written on the TCP connections (-compress only)
var wireIn, wireOut int64

type countingConn struct{ net.Conn }

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	atomic.AddInt64(&wireIn, int64(n))
	return n, err
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	atomic.AddInt64(&wireOut, int64(n))
	return n, err
}

// outbox: the messages a connection sends in turn, and with -compress the
// same as gorilla PreparedMessages, each deflated once for the whole run (the
// load generator's core is the bottleneck of scenario j: what a client spends
// deflating is not what is measured). Frames stay masked (one mask key per
// prepared frame); the upstream's echoes are inflated and compared as usual.
type outbox struct {
	msgs     [][]byte
	prepared []*websocket.PreparedMessage
	mt       int
}

func newOutbox() *outbox {
	o := &outbox{msgs: messages(), mt: frameType()}
	if opt.compress {
		for _, m := range o.msgs {
			pm, err := websocket.NewPreparedMessage(o.mt, m)
			if err != nil {
				fail("prepared message: %v", err)
			}
			o.prepared = append(o.prepared, pm)
		}
	}
	return o
}

// send writes message n (cycling) and returns its bytes.
func (o *outbox) send(ws *websocket.Conn, n int64) ([]byte, error) {
	i := int(n % int64(len(o.msgs)))
	if o.prepared != nil {
		return o.msgs[i], ws.WritePreparedMessage(o.prepared[i])
	}
	return o.msgs[i], ws.WriteMessage(o.mt, o.msgs[i])
}

// negotiated reports whether a handshake response accepted permessage-deflate
// (gorilla does not expose it on the Conn), with the header's value.
func negotiated(resp *http.Response) (bool, string) {
	if resp == nil {
		return false, ""
	}
	ext := strings.Join(resp.Header.Values("Sec-WebSocket-Extensions"), ", ")
	return strings.Contains(strings.ToLower(ext), "permessage-deflate"), ext
}

func message() []byte {
	m := make([]byte, opt.size)
	for i := range m {
		m[i] = 'a' + byte(i%26)
	}
	return m
}

// messages: what a connection sends, in turn (one for -payload ascii).
func messages() [][]byte {
	if opt.payload != "json" {
		return [][]byte{message()}
	}
	rng := rand.New(rand.NewSource(opt.seed))
	ms := make([][]byte, 32)
	for i := range ms {
		ms[i] = jsonMessage(rng, i, opt.size)
	}
	return ms
}

var (
	jsonEvents = []string{"page_view", "click", "add_to_cart", "purchase", "login", "logout", "search", "scroll"}
	jsonPrices = []int{499, 999, 1299, 1999, 2499, 4999, 7999, 9999, 14999, 19999, 29, 149}
	jsonCities = []struct {
		name, country string
		lat, lon      float64
	}{{"Paris", "FR", 48.85, 2.35}, {"Berlin", "DE", 52.52, 13.40}, {"New York", "US", 40.71, -74.00},
		{"London", "GB", 51.50, -0.12}, {"Madrid", "ES", 40.41, -3.70}, {"Rome", "IT", 41.90, 12.49},
		{"Amsterdam", "NL", 52.37, 4.90}, {"Sao Paulo", "BR", -23.55, -46.63}, {"Tokyo", "JP", 35.68, 139.69},
		{"Mumbai", "IN", 19.07, 72.87}, {"Lyon", "FR", 45.76, 4.83}, {"Chicago", "US", 41.87, -87.62}}
	jsonDevices = []string{"desktop", "mobile", "tablet"}
	jsonTags    = []string{"new", "sale", "premium", "trial", "beta", "vip", "returning", "promo"}
	jsonWords   = []string{"alpha", "bravo", "delta", "echo", "fox", "gamma", "kilo", "lima", "nova", "omega",
		"quartz", "river", "sierra", "tango", "ultra", "vector", "whisky", "zulu"}
)

// jsonMessage: a JSON object of exactly size bytes (ASCII), a batch of
// events with repeated keys and varied values, padded by a last string field.
func jsonMessage(rng *rand.Rand, seq, size int) []byte {
	b := make([]byte, 0, size+512)
	b = append(b, `{"type":"events","seq":`...)
	b = strconv.AppendInt(b, int64(seq), 10)
	b = append(b, `,"items":[`...)
	const tail = `],"pad":""}`
	// a batch as an application would send it: ids and times increasing,
	// users and sessions from small pools, places from a list of cities
	id := 1_000_000 + rng.Int63n(9_000_000)
	ms := rng.Intn(3_600_000)
	sessions := make([]string, 6)
	for i := range sessions {
		sessions[i] = strconv.FormatUint(rng.Uint64()>>16, 16)
	}
	for n := 0; ; n++ {
		var o []byte
		if n > 0 {
			o = append(o, ',')
		}
		id += 1 + rng.Int63n(20)
		ms += rng.Intn(2000)
		city := jsonCities[rng.Intn(len(jsonCities))]
		o = append(o, `{"id":`...)
		o = strconv.AppendInt(o, id, 10)
		o = append(o, `,"user":"u`...)
		o = strconv.AppendInt(o, int64(1000+rng.Intn(200)), 10)
		o = append(o, `","session":"`...)
		o = append(o, sessions[rng.Intn(len(sessions))]...)
		o = append(o, `","event":"`...)
		o = append(o, jsonEvents[rng.Intn(len(jsonEvents))]...)
		o = append(o, `","ts":"2026-12-07T15:`...)
		o = append(o, fmt.Sprintf("%02d:%02d.%03dZ", ms/60000%60, ms/1000%60, ms%1000)...)
		o = append(o, `","price":`...)
		o = strconv.AppendFloat(o, float64(jsonPrices[rng.Intn(len(jsonPrices))]+rng.Intn(3)*100)/100, 'f', 2, 64)
		o = append(o, `,"qty":`...)
		o = strconv.AppendInt(o, int64(1+rng.Intn(9)), 10)
		o = append(o, `,"country":"`...)
		o = append(o, city.country...)
		o = append(o, `","device":"`...)
		o = append(o, jsonDevices[rng.Intn(len(jsonDevices))]...)
		o = append(o, `","title":"`...)
		for w, nw := 0, 2+rng.Intn(3); w < nw; w++ {
			if w > 0 {
				o = append(o, ' ')
			}
			o = append(o, jsonWords[rng.Intn(len(jsonWords))]...)
		}
		o = append(o, `","tags":[`...)
		for t, nt := 0, rng.Intn(3); t < nt; t++ {
			if t > 0 {
				o = append(o, ',')
			}
			o = append(o, '"')
			o = append(o, jsonTags[rng.Intn(len(jsonTags))]...)
			o = append(o, '"')
		}
		o = append(o, `],"geo":{"city":"`...)
		o = append(o, city.name...)
		o = append(o, `","lat":`...)
		o = strconv.AppendFloat(o, city.lat+float64(rng.Intn(100))/1000, 'f', 3, 64)
		o = append(o, `,"lon":`...)
		o = strconv.AppendFloat(o, city.lon+float64(rng.Intn(100))/1000, 'f', 3, 64)
		o = append(o, `},"ok":`...)
		o = strconv.AppendBool(o, rng.Intn(10) > 0)
		o = append(o, '}')
		if len(b)+len(o)+len(tail) > size {
			break
		}
		b = append(b, o...)
	}
	b = append(b, `],"pad":"`...)
	for len(b)+2 < size {
		b = append(b, byte('a'+rng.Intn(26)))
	}
	b = append(b, `"}`...)
	if len(b) != size {
		// too small a -s for one object: plain letters then, still size bytes
		b = b[:0]
		for len(b) < size {
			b = append(b, byte('a'+rng.Intn(26)))
		}
	}
	return b
}

// deflateRatio: total bytes over total raw-deflate bytes, each message
// compressed on its own (no context takeover, as gorilla negotiates it).
func deflateRatio(ms [][]byte, level int) float64 {
	var raw, packed int
	for _, m := range ms {
		var buf bytes.Buffer
		w, _ := flate.NewWriter(&buf, level)
		w.Write(m)
		w.Flush() // a permessage-deflate message ends with a sync flush (its 4 last bytes are dropped)
		raw += len(m)
		packed += buf.Len() - 4
	}
	if packed <= 0 {
		return 0
	}
	return float64(raw) / float64(packed)
}

// payloadInfo: the fields every result carries about what was sent.
func payloadInfo(ms [][]byte) result {
	r := result{"payload": opt.payload, "compress": opt.compress}
	if opt.payload == "json" {
		r["seed"] = opt.seed
		r["payload_messages"] = len(ms)
		r["deflate_ratio_l1"] = deflateRatio(ms, 1) // gorilla's level (the echo's and loadgen's)
		r["deflate_ratio_l6"] = deflateRatio(ms, 6) // zlib's default level
	}
	return r
}

func (r result) with(extra result) result {
	for k, v := range extra {
		r[k] = v
	}
	return r
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
	ws         *websocket.Conn
	lat        latencies
	msgs       int64
	errors     int64
	mismatches int64
	bytesIn    int64 // payload bytes of every reply, in the window or not
}

type window struct {
	open int32 // 1 while the measured window is open
	stop int32 // 1 once senders must stop
}

func (w *window) measuring() bool { return atomic.LoadInt32(&w.open) == 1 }
func (w *window) stopped() bool   { return atomic.LoadInt32(&w.stop) == 1 }

// echoed accounts for one reply received for a message sent at sent; a
// reply that is not byte-identical to it is an error, in or out of the window.
func (pc *pingpongConn) echoed(w *window, sent time.Time, reply, msg []byte) {
	pc.bytesIn += int64(len(reply))
	if !bytes.Equal(reply, msg) {
		pc.errors++
		pc.mismatches++
		return
	}
	if !w.measuring() {
		return
	}
	pc.lat = append(pc.lat, micros(sent))
	pc.msgs++
}

// lockstep: one message in flight, sent and awaited by one goroutine.
func (pc *pingpongConn) lockstep(w *window, out *outbox) {
	for n := int64(0); n < opt.max && !w.stopped(); n++ {
		sent := time.Now()
		pc.ws.SetReadDeadline(sent.Add(10 * time.Second))
		msg, err := out.send(pc.ws, n)
		if err != nil {
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
func (pc *pingpongConn) pipelined(w *window, out *outbox) {
	type sending struct {
		at  time.Time
		msg []byte
	}
	sent := make(chan sending, opt.inflight)
	quit := make(chan struct{})
	defer close(quit)
	go func() {
		defer close(sent)
		for n := int64(0); n < opt.max && !w.stopped(); n++ {
			select {
			case sent <- sending{time.Now(), out.msgs[int(n%int64(len(out.msgs)))]}:
			case <-quit:
				return
			}
			if _, err := out.send(pc.ws, n); err != nil {
				return
			}
		}
	}()
	for s := range sent {
		pc.ws.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, reply, err := pc.ws.ReadMessage()
		if err != nil {
			pc.errors++
			return
		}
		pc.echoed(w, s.at, reply, s.msg)
	}
}

func pingpong() {
	d := dialer()
	out := newOutbox()
	ms := out.msgs
	var conns []*pingpongConn
	dialErrors, uncompressed, extHeader := 0, 0, ""
	for i := 0; i < opt.conns; i++ {
		ws, resp, err := d.Dial(opt.url, nil)
		if err != nil {
			dialErrors++
			continue
		}
		if opt.compress {
			ok, ext := negotiated(resp)
			extHeader = ext
			if !ok {
				uncompressed++
			}
		}
		conns = append(conns, &pingpongConn{ws: ws, lat: make(latencies, 0, 16<<10)})
	}
	if uncompressed > 0 {
		// no figure without the compression asked for: say so and stop
		for _, pc := range conns {
			pc.ws.Close()
		}
		fmt.Fprintf(os.Stderr, "loadgen: permessage-deflate NOT negotiated on %d of %d connections (Sec-WebSocket-Extensions: %q)\n",
			uncompressed, len(conns), extHeader)
		output(payloadInfo(ms).with(result{
			"mode": "pingpong", "connections": len(conns), "size": opt.size, "pipeline": opt.inflight,
			"binary": opt.binary, "msgs": 0, "errors": uncompressed + dialErrors, "connect_errors": dialErrors,
			"compression_not_negotiated": uncompressed, "extensions_header": extHeader,
			"first_error": fmt.Sprintf("permessage-deflate not negotiated (Sec-WebSocket-Extensions: %q)", extHeader),
		}))
		os.Exit(1)
	}
	var w window
	var wg sync.WaitGroup
	for _, pc := range conns {
		wg.Add(1)
		go func(pc *pingpongConn) {
			defer wg.Done()
			defer pc.ws.Close()
			if opt.inflight <= 1 {
				pc.lockstep(&w, out)
			} else {
				pc.pipelined(&w, out)
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
	var msgs, errs, mism, bytesIn int64
	for i, pc := range conns {
		parts[i] = pc.lat
		msgs += pc.msgs
		errs += pc.errors
		mism += pc.mismatches
		bytesIn += pc.bytesIn
	}
	all := merge(parts)
	extra := result{}
	if opt.payload != "ascii" || opt.compress {
		extra = payloadInfo(ms)
		extra["mismatches"] = mism
		if opt.compress {
			extra["compressed_conns"] = len(conns)
			extra["extensions_header"] = extHeader
			// echoes' payload bytes over the bytes read (handshakes included): near 1 means the
			// echoes did not arrive compressed, whatever the handshake said
			in := atomic.LoadInt64(&wireIn)
			extra["wire_bytes_in"] = in
			extra["wire_bytes_out"] = atomic.LoadInt64(&wireOut)
			if in > 0 {
				extra["wire_ratio_in"] = float64(bytesIn) / float64(in)
			}
		}
	}
	output(extra.with(result{
		"mode": "pingpong", "connections": len(conns), "size": opt.size, "pipeline": opt.inflight,
		"binary": opt.binary, "duration_s": elapsed, "msgs": msgs,
		"msgs_per_s":   float64(msgs) / elapsed,
		"mbytes_per_s": float64(msgs) * float64(opt.size) / elapsed / 1e6,
		"p50_us":       all.quantile(0.50), "p90_us": all.quantile(0.90),
		"p99_us": all.quantile(0.99), "max_us": all.quantile(1),
		"errors": errs + int64(dialErrors), "connect_errors": dialErrors,
		"loadgen_cpu_pct": 100 * cpu / elapsed,
	}))
}

// ------------------------------------------------------------------ idle

func idle() {
	d := dialer()
	ms, mt := messages(), frameType()
	conns := make([]*websocket.Conn, opt.conns)
	var dialErrs, echoErrs, uncompressed int64
	var extHeader atomic.Value
	slots := make(chan struct{}, opt.dialConc)
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := range conns {
		slots <- struct{}{}
		wg.Add(1)
		go func(i int) {
			defer func() { <-slots; wg.Done() }()
			ws, resp, err := d.Dial(opt.url, nil)
			if err != nil {
				atomic.AddInt64(&dialErrs, 1)
				return
			}
			if opt.compress {
				ok, ext := negotiated(resp)
				extHeader.Store(ext)
				if !ok {
					atomic.AddInt64(&uncompressed, 1)
				}
			}
			if opt.idleEcho {
				ws.SetReadDeadline(time.Now().Add(10 * time.Second))
				for k := 0; k < opt.idleMsgs && err == nil; k++ {
					msg := ms[(i+k)%len(ms)]
					err = ws.WriteMessage(mt, msg)
					if err == nil {
						var reply []byte
						_, reply, err = ws.ReadMessage()
						if err == nil && !bytes.Equal(reply, msg) {
							err = errors.New("echo differs")
						}
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
	if opt.payload != "ascii" || opt.compress || opt.idleMsgs != 1 {
		ready.with(payloadInfo(ms)).with(result{"size": opt.size, "idle_msgs": opt.idleMsgs})
	}
	if opt.compress {
		ext, _ := extHeader.Load().(string)
		ready["compression_not_negotiated"] = uncompressed
		ready["errors"] = dialErrs + uncompressed
		ready["extensions_header"] = ext
		if uncompressed > 0 {
			fmt.Fprintf(os.Stderr, "loadgen: permessage-deflate NOT negotiated on %d of %d connections (Sec-WebSocket-Extensions: %q)\n",
				uncompressed, open, ext)
		}
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
		opt.inflight < 1 || opt.inflight > 1024 || opt.dialConc < 1 || opt.max < 1 || opt.idleMsgs < 1 || opt.idleMsgs > 1000 {
		fail("out of range: -c 1..20000, -s 0..16M, -p 1..1024, -dialconc >= 1, -max >= 1, -idlemsgs 1..1000")
	}
	if opt.payload != "ascii" && opt.payload != "json" {
		fail("-payload: ascii or json")
	}
	if opt.payload == "json" && opt.binary {
		fail("-payload json is text: not with -binary")
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
	case "payload":
		ms := messages()
		output(payloadInfo(ms).with(result{"mode": "payload", "size": opt.size,
			"sample": string(ms[0][:minInt(len(ms[0]), 300)])}))
	default:
		fail("unknown mode %q", opt.mode)
	}
}

func minInt(a, b int) int {
	if a < b {
		return a
	}
	return b
}
