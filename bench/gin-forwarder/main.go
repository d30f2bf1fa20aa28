// Command gin-forwarder is the design this product started from, kept as a
// benchmark peer: a Gin server whose GET /ws upgrades the client with
// gorilla/websocket, dials one upstream connection for it, and runs two
// goroutines copying messages (type-preserving), one per direction. The first
// error in either direction forwards a close frame to both sides and closes
// both connections.
//
// Build (offline, GOPATH mode, Debian's golang-github-gin-gonic-gin-dev):
//
//	GO111MODULE=off GOPATH=/tmp/gopath:/usr/share/gocode go build -o /tmp/wsgw-bench/bin/gin-forwarder .
package main

import (
	"flag"
	"log"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/gin-gonic/gin"
	"github.com/gorilla/websocket"
)

var (
	listen   = flag.String("addr", "127.0.0.1:9201", "listen address (loopback only)")
	upstream = flag.String("upstream", "ws://127.0.0.1:9001/ws", "upstream ws:// URL (loopback only)")
	logger   = flag.Bool("logger", false, "add Gin's request logger (as gin.Default() does)")
)

var upgrader = websocket.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}

// copyMessages moves messages from src to dst until either side fails.
func copyMessages(src, dst *websocket.Conn, failed chan<- error) {
	for {
		kind, data, err := src.ReadMessage()
		if err == nil {
			err = dst.WriteMessage(kind, data)
		}
		if err != nil {
			failed <- err
			return
		}
	}
}

func forward(c *gin.Context) {
	client, err := upgrader.Upgrade(c.Writer, c.Request, nil)
	if err != nil {
		return
	}
	up, _, err := websocket.DefaultDialer.Dial(*upstream, nil)
	if err != nil {
		client.WriteControl(websocket.CloseMessage,
			websocket.FormatCloseMessage(1014, "upstream unavailable"), time.Now().Add(time.Second))
		client.Close()
		return
	}
	failed := make(chan error, 2)
	go copyMessages(client, up, failed)
	go copyMessages(up, client, failed)
	err = <-failed

	code := websocket.CloseNormalClosure
	if ce, ok := err.(*websocket.CloseError); ok && ce.Code != websocket.CloseNoStatusReceived {
		code = ce.Code
	}
	frame := websocket.FormatCloseMessage(code, "")
	deadline := time.Now().Add(time.Second)
	up.WriteControl(websocket.CloseMessage, frame, deadline)
	client.WriteControl(websocket.CloseMessage, frame, deadline)
	up.Close()
	client.Close()
}

func loopback(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	ip := net.ParseIP(host)
	return err == nil && ip != nil && ip.IsLoopback()
}

func main() {
	flag.Parse()
	u, err := url.Parse(*upstream)
	if !loopback(*listen) || err != nil || !loopback(u.Host) {
		log.Fatalf("gin-forwarder: %s and %s must both be loopback host:port", *listen, *upstream)
	}
	gin.SetMode(gin.ReleaseMode)
	r := gin.New()
	if *logger {
		r.Use(gin.Logger())
	}
	r.Use(gin.Recovery())
	r.GET("/ws", forward)
	log.Printf("gin-forwarder: ws://%s/ws -> %s", *listen, *upstream)
	log.Fatal(r.Run(*listen))
}
