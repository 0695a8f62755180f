package nodetaint

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
)

// Event reasons on the Node.
const (
	EventTainted   = "SidelaneAgentNotReady"
	EventUntainted = "SidelaneAgentReady"
)

// resync re-decides every node this often, in case an event was missed.
const resync = 30 * time.Second

// Config is what the controller watches and writes.
type Config struct {
	Client kubernetes.Interface
	// Namespace and Selector find the agent DaemonSet's pods.
	Namespace string
	Selector  labels.Selector
	// Key and Effect are the taint (the agent's kube.TaintKey, NoSchedule).
	Key    string
	Effect corev1.TaintEffect
}

// Controller adds and removes the taint; Start runs its informers, Run
// writes (one leadership term).
type Controller struct {
	cfg      Config
	log      *slog.Logger
	nodes    corelisters.NodeLister
	pods     corelisters.PodLister
	synced   []cache.InformerSynced
	start    func(<-chan struct{})
	queue    workqueue.TypedRateLimitingInterface[string]
	recorder record.EventRecorder
	bcast    record.EventBroadcaster
	changes  *prometheus.CounterVec
	errors   prometheus.Counter
}

// New wires the informers (nodes; agent pods in Namespace matching
// Selector) and registers the metrics on reg.
func New(log *slog.Logger, cfg Config, reg prometheus.Registerer) (*Controller, error) {
	if cfg.Namespace == "" || cfg.Selector == nil || cfg.Selector.Empty() || cfg.Key == "" {
		return nil, fmt.Errorf("node taint controller: namespace, agent selector and taint key are required")
	}
	c := &Controller{
		cfg: cfg,
		log: log,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "nodetaint"}),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sidelane_node_taint_changes_total",
			Help: "Changes of the " + cfg.Key + " taint the controller made, by action (added: an agent pod was not ready; removed: it was)."}, []string{"action"}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{Name: "sidelane_node_taint_errors_total", Help: "Failed taint updates (retried)."}),
	}
	if reg != nil {
		for _, col := range []prometheus.Collector{c.changes, c.errors} {
			if err := reg.Register(col); err != nil {
				return nil, fmt.Errorf("register node taint metrics: %w", err)
			}
		}
	}
	nf := informers.NewSharedInformerFactory(cfg.Client, resync)
	pf := informers.NewSharedInformerFactoryWithOptions(cfg.Client, resync, informers.WithNamespace(cfg.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = cfg.Selector.String() }))
	nodeInf, podInf := nf.Core().V1().Nodes(), pf.Core().V1().Pods()
	enqueueNode := func(obj any) {
		if n, ok := obj.(*corev1.Node); ok {
			c.queue.Add(n.Name)
		}
	}
	enqueuePod := func(obj any) {
		if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		if p, ok := obj.(*corev1.Pod); ok && p.Spec.NodeName != "" {
			c.queue.Add(p.Spec.NodeName)
		}
	}
	if _, err := nodeInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueueNode, UpdateFunc: func(_, n any) { enqueueNode(n) },
	}); err != nil {
		return nil, err
	}
	if _, err := podInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueuePod, UpdateFunc: func(_, p any) { enqueuePod(p) }, DeleteFunc: enqueuePod,
	}); err != nil {
		return nil, err
	}
	c.nodes, c.pods = nodeInf.Lister(), podInf.Lister()
	c.synced = []cache.InformerSynced{nodeInf.Informer().HasSynced, podInf.Informer().HasSynced}
	c.start = func(stop <-chan struct{}) { nf.Start(stop); pf.Start(stop) }
	c.bcast = record.NewBroadcaster()
	c.recorder = c.bcast.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "sidelane-controller"})
	return c, nil
}

// Start runs the informers until ctx ends (the process's context, as for
// the L7 controller: standby replicas keep warm caches).
func (c *Controller) Start(ctx context.Context) {
	c.start(ctx.Done())
	c.bcast.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: c.cfg.Client.CoreV1().Events("")})
	context.AfterFunc(ctx, func() { c.bcast.Shutdown(); c.queue.ShutDown() })
}

// Synced reports whether the caches have synced.
func (c *Controller) Synced() bool {
	for _, s := range c.synced {
		if !s() {
			return false
		}
	}
	return true
}

// Run processes nodes until ctx ends (one leadership term; only the
// leader writes).
func (c *Controller) Run(ctx context.Context) {
	if !cache.WaitForCacheSync(ctx.Done(), c.synced...) {
		return
	}
	nodes, _ := c.nodes.List(labels.Everything())
	for _, n := range nodes {
		c.queue.Add(n.Name)
	}
	// Get blocks: the end of the term wakes it with an empty name, so a
	// replica that lost the Lease stops before its next write.
	stop := context.AfterFunc(ctx, func() { c.queue.Add("") })
	defer stop()
	for {
		name, shutdown := c.queue.Get()
		if shutdown {
			return
		}
		if name == "" || ctx.Err() != nil {
			c.queue.Done(name)
			if ctx.Err() != nil {
				return
			}
			continue
		}
		if err := c.sync(ctx, name); err != nil && ctx.Err() == nil {
			c.errors.Inc()
			c.log.Error("node taint", "node", name, "error", err)
			c.queue.AddRateLimited(name)
		} else {
			c.queue.Forget(name)
		}
		c.queue.Done(name)
	}
}

func (c *Controller) sync(ctx context.Context, name string) error {
	node, err := c.nodes.Get(name)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	pods, err := c.pods.List(labels.Everything())
	if err != nil {
		return err
	}
	action, reason := Decide(node, pods, c.cfg.Key, c.cfg.Effect)
	if action == None {
		return nil
	}
	changed, err := c.patch(ctx, name, action == Add)
	if err != nil || !changed {
		return err
	}
	c.changes.WithLabelValues(action.String()).Inc()
	ref := &corev1.ObjectReference{Kind: "Node", Name: name, UID: types.UID(name)}
	if action == Add {
		c.log.Warn("node tainted: its sidelane agent is not ready", "node", name, "taint", c.cfg.Key, "reason", reason)
		c.recorder.Eventf(ref, corev1.EventTypeWarning, EventTainted, "sidelane tainted the node %s:%s: %s", c.cfg.Key, c.cfg.Effect, reason)
	} else {
		c.log.Info("node taint removed: its sidelane agent is ready", "node", name, "taint", c.cfg.Key, "reason", reason)
		c.recorder.Eventf(ref, corev1.EventTypeNormal, EventUntainted, "sidelane removed the taint %s:%s: %s", c.cfg.Key, c.cfg.Effect, reason)
	}
	return nil
}

// patch adds or removes the taint from the node as the API server has it.
// The merge patch carries the resourceVersion it was computed from, so a
// concurrent change (another taint, the agent's own update) makes it fail
// with a conflict and the queue retries it from a fresh read: no other
// taint is ever lost.
func (c *Controller) patch(ctx context.Context, name string, present bool) (bool, error) {
	nodes := c.cfg.Client.CoreV1().Nodes()
	node, err := nodes.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("get node %s: %w", name, err)
	}
	ours := func(t corev1.Taint) bool { return t.Key == c.cfg.Key && t.Effect == c.cfg.Effect }
	if slices.ContainsFunc(node.Spec.Taints, ours) == present {
		return false, nil
	}
	taints := slices.DeleteFunc(slices.Clone(node.Spec.Taints), ours)
	if present {
		taints = append(taints, corev1.Taint{Key: c.cfg.Key, Effect: c.cfg.Effect})
	}
	p, err := json.Marshal(map[string]any{
		"metadata": map[string]any{"resourceVersion": node.ResourceVersion},
		"spec":     map[string]any{"taints": taints},
	})
	if err != nil {
		return false, err
	}
	if _, err := nodes.Patch(ctx, name, types.MergePatchType, p, metav1.PatchOptions{}); err != nil {
		return false, fmt.Errorf("patch taints of node %s: %w", name, err)
	}
	return true, nil
}
