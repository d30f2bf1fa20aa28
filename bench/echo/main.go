// Command echo is the benchmark's upstream: a gorilla/websocket server that
// sends every message back with its type, on any path. It listens on
// loopback only (default ws://127.0.0.1:9001/ws). With -compress it accepts a
// permessage-deflate offer (RFC 7692; gorilla: no context takeover only, at
// compression level 1) and compresses its echoes; a client that offers
// nothing gets uncompressed frames as before.
//
// Build (offline, GOPATH mode): GO111MODULE=off GOPATH=/tmp/gopath:/usr/share/gocode go build -o /tmp/wsgw-bench/bin/echo .
package main

import (
	"flag"
	"log"
	"net"
	"net/http"

	"github.com/gorilla/websocket"
)

var upgrader = websocket.Upgrader{
	ReadBufferSize:  4096,
	WriteBufferSize: 4096,
	CheckOrigin:     func(*http.Request) bool { return true },
}

func serve(w http.ResponseWriter, r *http.Request) {
	ws, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // Upgrade already answered with an HTTP error
	}
	defer ws.Close()
	for {
		kind, data, err := ws.ReadMessage()
		if err != nil {
			return // gorilla's default close handler has answered a close frame
		}
		if ws.WriteMessage(kind, data) != nil {
			return
		}
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:9001", "listen address (loopback only)")
	flag.BoolVar(&upgrader.EnableCompression, "compress", false, "accept permessage-deflate offers")
	flag.Parse()
	host, _, err := net.SplitHostPort(*addr)
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
		log.Fatalf("echo: %q is not a loopback address", *addr)
	}
	log.Printf("echo: ws://%s/ws (permessage-deflate accepted: %v)", *addr, upgrader.EnableCompression)
	log.Fatal(http.ListenAndServe(*addr, http.HandlerFunc(serve)))
}
