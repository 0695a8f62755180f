// Package kube connects the node agent to the Kubernetes API: informers for
// the node's pods and all namespaces, a Classifier that answers the CNI
// plugin from that cache, live moves of running pods when their labels or
// their namespace's labels change, the startup reconcile, and the node's
// sidelane.io/agent-not-ready taint.
package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"

	"github.com/sidelane/sidelane/agent"
	"github.com/sidelane/sidelane/agent/cnirpc"
	"github.com/sidelane/sidelane/agent/metrics"
	"github.com/sidelane/sidelane/agent/store"
	"github.com/sidelane/sidelane/istio/capture"
	capturekube "github.com/sidelane/sidelane/istio/capture/kube"
	"github.com/sidelane/sidelane/istio/classify"
)

// Taint keeps new pods off a node whose agent is not ready. Cluster
// operators register nodes with it (kubelet --register-with-taints); the
// agent removes it once ready and puts it back on graceful shutdown.
const (
	TaintKey    = "sidelane.io/agent-not-ready"
	TaintEffect = corev1.TaintEffectNoSchedule
)

// Event reasons on pods.
const (
	EventModeChanged     = "SidelaneModeChanged"
	EventModeChangeError = "SidelaneModeChangeFailed"
	// EventRestartRequired: the pod's labels or annotations changed in a
	// way that applies only to a new pod (classify.Live): its capture was
	// fixed when it was created.
	EventRestartRequired = "SidelaneRestartRequired"
	// EventDatapathRepaired (on the node): the agent found one of its
	// eBPF attachments detached, replaced or unpinned and put it back.
	EventDatapathRepaired = "SidelaneDatapathRepaired"
)

// DefaultWait bounds how long Classify waits for a pod it has not seen yet.
const DefaultWait = 2 * time.Second

// Target is the agent the controller drives (*agent.Agent).
type Target interface {
	Store() *store.Store
	SetMode(ctx context.Context, k store.Key, dec agent.Decision) (store.Entry, bool, error)
	Forget(ctx context.Context, k store.Key) error
}

// CaptureFunc computes a sidecar pod's capture settings from its spec
// (traffic.sidecar.istio.io/* annotations and friends). An error is a
// misconfigured pod: it fails ADD with a message naming the annotation.
// Warnings are logged.
type CaptureFunc func(pod *corev1.Pod) (*capture.Settings, []string, error)

// IstioCapture reads the capture settings the way istio-cni does
// (istio/capture): strict, so a value Istio rejects fails the pod's ADD
// (as it fails Istio CNI's) instead of capturing something else.
func IstioCapture(pod *corev1.Pod) (*capture.Settings, []string, error) {
	s, warnings, err := capture.Parse(capturekube.Pod(pod))
	if err != nil {
		return nil, warnings, err
	}
	return &s, warnings, nil
}

// Config is what the controller needs.
type Config struct {
	Client   kubernetes.Interface
	NodeName string
	Classify classify.Config
	Log      *slog.Logger
	Metrics  *metrics.Metrics
	// Wait bounds Classify's wait for an unseen pod (default DefaultWait).
	Wait time.Duration
	// Capture fills Decision.Capture for sidecar pods (IstioCapture in the
	// agent); nil leaves Capture nil.
	Capture CaptureFunc
	// ManageTaint removes/re-adds TaintKey on the node (default on in cmd).
	ManageTaint bool
	// DaemonSet, when set, is the agent's own DaemonSet: a graceful stop
	// re-adds the taint only while it exists (a rollout, a pod restart),
	// not when it is gone or being deleted (helm uninstall), which would
	// leave the node tainted with no agent to remove it.
	DaemonSet types.NamespacedName
	// Self, when set, is the agent's own pod (the chart passes its name
	// with the downward API). OnReady then removes the taint only once
	// the pod is Ready (nodetaint.PodReady, kubelet's readiness probe
	// passed), the test the controller's taint loop applies: removing it
	// earlier, while kubelet still reports the pod not Ready, made that
	// loop put it back until the probe passed, on every agent restart.
	// Unset (an agent run outside a pod): OnReady removes it at once.
	Self types.NamespacedName
}

// Controller is the agent's Kubernetes side.
type Controller struct {
	cfg      Config
	log      *slog.Logger
	factory  informers.SharedInformerFactory
	nsFact   informers.SharedInformerFactory
	pods     listerscorev1.PodLister
	nss      listerscorev1.NamespaceLister
	synced   []cache.InformerSynced
	queue    workqueue.TypedRateLimitingInterface[string]
	recorder record.EventRecorder
	bcast    record.EventBroadcaster

	mu      sync.Mutex
	target  Target
	changed chan struct{} // closed and replaced on every cache change
}

// New builds the informers; nothing talks to the API server until Start.
func New(cfg Config) (*Controller, error) {
	if cfg.Client == nil {
		return nil, errors.New("kube: a client is required")
	}
	if cfg.NodeName == "" {
		return nil, errors.New("kube: node name is required (--node-name or NODE_NAME)")
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Wait <= 0 {
		cfg.Wait = DefaultWait
	}
	c := &Controller{cfg: cfg, log: cfg.Log, changed: make(chan struct{})}
	// Only this node's pods: the agent never needs (or may read) others.
	c.factory = informers.NewSharedInformerFactoryWithOptions(cfg.Client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", cfg.NodeName).String()
		}))
	c.nsFact = informers.NewSharedInformerFactory(cfg.Client, 0)
	podInf := c.factory.Core().V1().Pods()
	nsInf := c.nsFact.Core().V1().Namespaces()
	c.pods, c.nss = podInf.Lister(), nsInf.Lister()
	c.synced = []cache.InformerSynced{podInf.Informer().HasSynced, nsInf.Informer().HasSynced}
	c.queue = workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "sidelane-reclassify"})

	if _, err := podInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { c.notify() },
		UpdateFunc: func(oldObj, newObj any) {
			c.notify()
			o, n := oldObj.(*corev1.Pod), newObj.(*corev1.Pod)
			if !mapsEqual(o.Labels, n.Labels) || !mapsEqual(o.Annotations, n.Annotations) {
				c.queue.Add(n.Namespace + "/" + n.Name)
			}
		},
	}); err != nil {
		return nil, err
	}
	if _, err := nsInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { c.notify() },
		UpdateFunc: func(oldObj, newObj any) {
			c.notify()
			o, n := oldObj.(*corev1.Namespace), newObj.(*corev1.Namespace)
			if !mapsEqual(o.Labels, n.Labels) {
				c.enqueueNamespace(n.Name)
			}
		},
	}); err != nil {
		return nil, err
	}

	c.bcast = record.NewBroadcaster()
	c.recorder = c.bcast.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "sidelane-agent", Host: cfg.NodeName})
	return c, nil
}

// SetTarget binds the agent; call it before the agent runs.
func (c *Controller) SetTarget(t Target) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.target = t
}

func (c *Controller) agent() Target {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.target
}

func (c *Controller) notify() {
	c.mu.Lock()
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
}

func (c *Controller) changes() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}

// Start is the agent's startup hook: it starts the informers, waits for
// them to sync, reconciles every attachment the agent knows with the API's
// view, and starts the workers that apply live changes. The agent is not
// ready (ADD fails closed) until it returns.
func (c *Controller) Start(ctx context.Context) error {
	if c.agent() == nil {
		return errors.New("kube: no agent bound (SetTarget)")
	}
	c.bcast.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: c.cfg.Client.CoreV1().Events("")})
	context.AfterFunc(ctx, c.bcast.Shutdown)
	c.factory.Start(ctx.Done())
	c.nsFact.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), c.synced...) {
		return fmt.Errorf("informer caches did not sync: %w", ctx.Err())
	}
	c.log.Info("kubernetes caches synced", "node", c.cfg.NodeName)
	c.reconcile(ctx)
	go c.work(ctx)
	context.AfterFunc(ctx, c.queue.ShutDown)
	return nil
}

// reconcile brings every stored attachment in line with the API: pods
// deleted while the agent was down are forgotten, pods whose labels changed
// are moved.
func (c *Controller) reconcile(ctx context.Context) {
	t := c.agent()
	for _, e := range t.Store().List() {
		if e.PodNamespace == "" || e.PodName == "" {
			continue // not a Kubernetes sandbox
		}
		pod, err := c.pods.Pods(e.PodNamespace).Get(e.PodName)
		if apierrors.IsNotFound(err) || (err == nil && e.PodUID != "" && string(pod.UID) != e.PodUID) {
			if err := t.Forget(ctx, e.Key); err != nil {
				if errors.Is(err, agent.ErrStopped) {
					return // shutting down: the next start reconciles
				}
				c.cfg.Metrics.Error("reconcile")
				c.log.Error("forget attachment of deleted pod", "pod", e.PodNamespace+"/"+e.PodName, "attachment", e.Key.String(), "error", err)
				continue
			}
			c.log.Info("forgot attachment of a pod deleted while the agent was down", "pod", e.PodNamespace+"/"+e.PodName, "attachment", e.Key.String())
			continue
		}
		if err != nil {
			c.log.Error("read pod from cache", "pod", e.PodNamespace+"/"+e.PodName, "error", err)
			continue
		}
		c.apply(ctx, e, pod)
	}
}

func (c *Controller) enqueueNamespace(ns string) {
	for _, e := range c.agent().Store().List() {
		if e.PodNamespace == ns {
			c.queue.Add(e.PodNamespace + "/" + e.PodName)
		}
	}
}

func (c *Controller) work(ctx context.Context) {
	for {
		key, shutdown := c.queue.Get()
		if shutdown {
			return
		}
		err := c.reclassify(ctx, key)
		if err != nil && ctx.Err() == nil {
			c.cfg.Metrics.Error("reclassify")
			c.log.Error("reclassify pod", "pod", key, "error", err)
			c.queue.AddRateLimited(key)
		} else {
			c.queue.Forget(key)
		}
		c.queue.Done(key)
	}
}

// reclassify re-decides every attachment of one pod and moves it when the
// decision changed.
func (c *Controller) reclassify(ctx context.Context, key string) error {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return err
	}
	pod, err := c.pods.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return nil // DEL takes care of it
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range c.agent().Store().List() {
		if e.PodNamespace != ns || e.PodName != name || (e.PodUID != "" && e.PodUID != string(pod.UID)) {
			continue
		}
		if err := c.apply(ctx, e, pod); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// apply moves one attachment to the pod's current decision, with a log
// line, a metric and an Event on the pod for every change.
func (c *Controller) apply(ctx context.Context, e store.Entry, pod *corev1.Pod) error {
	dec, err := c.decideLive(e, pod)
	if err != nil {
		c.recorder.Eventf(pod, corev1.EventTypeWarning, EventModeChangeError, "sidelane cannot classify the pod: %v", err)
		return err
	}
	old, changed, err := c.agent().SetMode(ctx, e.Key, dec)
	if errors.Is(err, agent.ErrUnknownAttachment) {
		return nil // DEL removed it meanwhile
	}
	if errors.Is(err, agent.ErrStopped) {
		return nil // shutting down: the next start decides again
	}
	if err != nil {
		c.recorder.Eventf(pod, corev1.EventTypeWarning, EventModeChangeError, "sidelane could not move the pod from %s to %s mode: %v", old.Mode, dec.Mode, err)
		return err
	}
	if !changed {
		return nil
	}
	c.cfg.Metrics.Transition(old.Mode, dec.Mode)
	c.log.Info("pod mode changed", "pod", pod.Namespace+"/"+pod.Name, "attachment", e.Key.String(), "from", old.Mode, "to", dec.Mode, "reason", dec.Reason)
	c.recorder.Eventf(pod, corev1.EventTypeNormal, EventModeChanged, "sidelane moved the pod from %s to %s mode: %s", old.Mode, dec.Mode, dec.Reason)
	return nil
}

// nsLabels reads the pod's namespace's labels from the cache (nil when
// the namespace is gone).
func (c *Controller) nsLabels(namespace string) (map[string]string, error) {
	ns, err := c.nss.Get(namespace)
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return ns.Labels, nil
}

// decide classifies a cached pod with its namespace's labels: the decision
// for a new sandbox (CNI ADD).
func (c *Controller) decide(pod *corev1.Pod) (agent.Decision, error) {
	nsLabels, err := c.nsLabels(pod.Namespace)
	if err != nil {
		return agent.Decision{}, err
	}
	d := classify.Classify(c.cfg.Classify, classify.Input{Pod: pod, NamespaceLabels: nsLabels})
	c.cfg.Metrics.Decision(string(d.Mode), string(d.Rule))
	out := agent.Decision{Mode: string(d.Mode), Reason: d.Reason, Rule: string(d.Rule)}
	if d.Mode == classify.ModeSidecar && c.cfg.Capture != nil {
		s, warnings, err := c.cfg.Capture(pod)
		for _, w := range warnings {
			c.log.Warn("capture setting", "pod", pod.Namespace+"/"+pod.Name, "warning", w)
		}
		if err != nil {
			return agent.Decision{}, fmt.Errorf("capture settings of pod %s/%s: %w", pod.Namespace, pod.Name, err)
		}
		out.Capture = s
	}
	return out, nil
}

// decideLive re-decides a running attachment with classify.Live: only the
// istio.io/dataplane-mode labels move it, and a sidecar pod keeps the
// capture settings it had when it was created (Istio reads the
// traffic.sidecar.istio.io/* annotations only then). What the pod's labels
// and annotations now ask for but only a restart would apply is logged and
// recorded as an EventRestartRequired Event.
func (c *Controller) decideLive(e store.Entry, pod *corev1.Pod) (agent.Decision, error) {
	nsLabels, err := c.nsLabels(pod.Namespace)
	if err != nil {
		return agent.Decision{}, err
	}
	at := classify.Decision{Mode: classify.Mode(e.Mode), Rule: classify.Rule(e.Rule), Reason: e.Reason}
	d, held := classify.Live(c.cfg.Classify, at, classify.Input{Pod: pod, NamespaceLabels: nsLabels})
	c.cfg.Metrics.Decision(string(d.Mode), string(d.Rule))
	out := agent.Decision{Mode: string(d.Mode), Reason: d.Reason, Rule: string(d.Rule)}
	if d.Mode == classify.ModeSidecar && e.Mode == agent.ModeSidecar {
		out.Capture = e.Capture
		if note := c.captureChanged(e, pod); note != "" {
			held = strings.TrimPrefix(held+"; "+note, "; ")
		}
	}
	if held != "" {
		c.log.Info("pod change needs a restart", "pod", pod.Namespace+"/"+pod.Name, "attachment", e.Key.String(), "mode", d.Mode, "note", held)
		c.recorder.Eventf(pod, corev1.EventTypeNormal, EventRestartRequired, "sidelane keeps the pod in %s mode: %s", d.Mode, held)
	}
	return out, nil
}

// captureChanged says, when the pod's capture annotations now give other
// settings than the running sidecar pod was enrolled with, that they apply
// only after a restart ("" when nothing changed).
func (c *Controller) captureChanged(e store.Entry, pod *corev1.Pod) string {
	if c.cfg.Capture == nil {
		return ""
	}
	s, _, err := c.cfg.Capture(pod)
	switch {
	case err != nil:
		return fmt.Sprintf("its capture annotations are now invalid (%v); the settings from its creation stay in force", err)
	case !reflect.DeepEqual(s, e.Capture):
		return "its capture annotations (traffic.sidecar.istio.io/* and friends) changed, but Istio applies them only when a pod is created: the settings from its creation stay in force; restart the pod to apply the new ones"
	}
	return ""
}

// Classify implements agent.Classifier from the informer cache. A pod the
// cache has not seen yet (the CNI ADD can beat the watch event) is waited
// for, up to Config.Wait; then the error wraps cnirpc.ErrRetry so the
// runtime retries the sandbox.
func (c *Controller) Classify(ctx context.Context, ref cnirpc.PodRef) (agent.Decision, error) {
	if ref.Namespace == "" || ref.Name == "" {
		return agent.Decision{Mode: agent.ModeNone, Reason: "not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS)"}, nil
	}
	timer := time.NewTimer(c.cfg.Wait)
	defer timer.Stop()
	for {
		changed := c.changes()
		pod, err := c.pods.Pods(ref.Namespace).Get(ref.Name)
		if err == nil && (ref.UID == "" || string(pod.UID) == ref.UID) {
			if _, nerr := c.nss.Get(ref.Namespace); nerr == nil {
				return c.decide(pod)
			}
		}
		select {
		case <-changed:
		case <-timer.C:
			what := "pod"
			if err == nil {
				what = "pod's namespace (or the pod with uid " + ref.UID + ")"
			}
			return agent.Decision{}, fmt.Errorf("%s %s/%s not in the agent's cache after %s: %w", what, ref.Namespace, ref.Name, c.cfg.Wait, cnirpc.ErrRetry)
		case <-ctx.Done():
			return agent.Decision{}, fmt.Errorf("wait for pod %s/%s: %w", ref.Namespace, ref.Name, ctx.Err())
		}
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// NodeEventf records a Warning Event on this agent's node (kubelet's
// convention for node references: the UID is the node's name).
func (c *Controller) NodeEventf(reason, format string, args ...any) {
	ref := &corev1.ObjectReference{Kind: "Node", Name: c.cfg.NodeName, UID: types.UID(c.cfg.NodeName)}
	c.recorder.Eventf(ref, corev1.EventTypeWarning, reason, format, args...)
}
