package istiod

import (
	"fmt"
	"sort"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	// Envoy extensions istiod puts inside Any fields of a sidecar's
	// listeners, so the registry can unpack (and validate) them.
	_ "github.com/cncf/xds/go/udpa/type/v1"
	_ "github.com/cncf/xds/go/xds/type/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/cors/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/grpc_stats/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/jwt_authn/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/http_inspector/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/request_id/uuid/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

// opaqueTypePrefixes are Istio's own extension protos (metadata exchange,
// stats, ALPN, authn): not in go-control-plane, so they are counted but
// cannot be validated here.
var opaqueTypePrefixes = []string{
	"type.googleapis.com/istio.",
	"type.googleapis.com/io.istio.",
	"type.googleapis.com/stats.",
	"type.googleapis.com/envoy.tcp.metadataexchange.", // Istio proxy's TCP metadata exchange
}

// validation is the outcome of validating a resource tree.
type validation struct {
	checked int            // messages ValidateAll ran on (the root and every unpacked Any)
	opaque  map[string]int // Istio-only type URLs seen (not validated)
	errs    []string       // validation and unknown-type errors
}

type validator interface{ ValidateAll() error }

// validateDeep runs ValidateAll on m and, recursively, on the content of
// every Any (and TypedStruct) inside it: ValidateAll never looks inside an
// Any by itself.
func validateDeep(m proto.Message, path string, v *validation) {
	if v.opaque == nil {
		v.opaque = map[string]int{}
	}
	if val, ok := m.(validator); ok {
		v.checked++
		if err := val.ValidateAll(); err != nil {
			v.errs = append(v.errs, fmt.Sprintf("%s (%T): %v", path, m, err))
		}
	}
	walk(m.ProtoReflect(), path, v)
}

func walk(m protoreflect.Message, path string, v *validation) {
	if a, ok := m.Interface().(*anypb.Any); ok {
		unpackAny(a, path, v)
		return
	}
	if ts, ok := typedStruct(m); ok {
		unpackStruct(ts.url, ts.value, path, v)
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, val protoreflect.Value) bool {
		p := path + "." + string(fd.Name())
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := val.List()
			for i := 0; i < l.Len(); i++ {
				walk(l.Get(i).Message(), fmt.Sprintf("%s[%d]", p, i), v)
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			val.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				walk(mv.Message(), fmt.Sprintf("%s[%v]", p, k.Interface()), v)
				return true
			})
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			walk(val.Message(), p, v)
		}
		return true
	})
}

func unpackAny(a *anypb.Any, path string, v *validation) {
	mt, err := protoregistry.GlobalTypes.FindMessageByURL(a.GetTypeUrl())
	if err != nil {
		if opaque(a.GetTypeUrl()) {
			v.opaque[a.GetTypeUrl()]++
			return
		}
		v.errs = append(v.errs, fmt.Sprintf("%s: unknown type %s (import its package in validate_test.go)", path, a.GetTypeUrl()))
		return
	}
	inner := mt.New().Interface()
	if err := proto.Unmarshal(a.GetValue(), inner); err != nil {
		v.errs = append(v.errs, fmt.Sprintf("%s: unpack %s: %v", path, a.GetTypeUrl(), err))
		return
	}
	validateDeep(inner, path+"<"+shortType(a.GetTypeUrl())+">", v)
}

type tsFields struct {
	url   string
	value *structpb.Struct
}

// typedStruct recognises xds.type.v3.TypedStruct and udpa.type.v1.TypedStruct.
func typedStruct(m protoreflect.Message) (tsFields, bool) {
	name := m.Descriptor().FullName()
	if name != "xds.type.v3.TypedStruct" && name != "udpa.type.v1.TypedStruct" {
		return tsFields{}, false
	}
	url := m.Get(m.Descriptor().Fields().ByName("type_url")).String()
	sv, _ := m.Get(m.Descriptor().Fields().ByName("value")).Message().Interface().(*structpb.Struct)
	return tsFields{url: url, value: sv}, true
}

func unpackStruct(url string, s *structpb.Struct, path string, v *validation) {
	mt, err := protoregistry.GlobalTypes.FindMessageByURL(url)
	if err != nil {
		if opaque(url) {
			v.opaque[url]++
			return
		}
		v.errs = append(v.errs, fmt.Sprintf("%s: unknown TypedStruct type %s", path, url))
		return
	}
	b, err := protojson.Marshal(s)
	if err != nil {
		v.errs = append(v.errs, fmt.Sprintf("%s: %v", path, err))
		return
	}
	inner := mt.New().Interface()
	if err := protojson.Unmarshal(b, inner); err != nil {
		v.errs = append(v.errs, fmt.Sprintf("%s: TypedStruct %s: %v", path, url, err))
		return
	}
	validateDeep(inner, path+"<"+shortType(url)+">", v)
}

func opaque(url string) bool {
	for _, p := range opaqueTypePrefixes {
		if strings.HasPrefix(url, p) {
			return true
		}
	}
	return false
}

func shortType(url string) string { return url[strings.LastIndex(url, "/")+1:] }

func (v *validation) opaqueTypes() string {
	var s []string
	for u, n := range v.opaque {
		s = append(s, fmt.Sprintf("%s x%d", u, n))
	}
	sort.Strings(s)
	return strings.Join(s, ", ")
}
