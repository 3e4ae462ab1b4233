// Peer: Go's net/http/httputil.ReverseProxy, keep-alive pool to the origin.
//
// bench/setup.sh installs Go (Debian's golang-go) when it is missing; the
// harness builds this file into its temp dir with `go build` and skips the
// row with a note where there is no `go`.  Pinned to one core by taskset,
// the Go runtime sees one CPU, so GOMAXPROCS is 1 like the other peers.
//
//	go run bench/peers/goproxy.go -port 8080 -origin http://127.0.0.1:8081
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
)

func main() {
	port := flag.Int("port", 0, "port to listen on, on 127.0.0.1")
	origin := flag.String("origin", "", "origin URL, http://host:port")
	flag.Parse()
	target, err := url.Parse(*origin)
	if err != nil || *port == 0 {
		log.Fatalf("usage: goproxy -port N -origin http://host:port")
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConns = 256
	transport.MaxIdleConnsPerHost = 256
	proxy.Transport = transport
	proxy.ErrorLog = log.New(log.Writer(), "goproxy: ", 0)
	addr := fmt.Sprintf("127.0.0.1:%d", *port)
	log.Fatal(http.ListenAndServe(addr, proxy))
}
